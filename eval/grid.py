"""PNG grids of samples."""
import pathlib

import numpy as np
from PIL import Image

from tesserax.data.preprocess import to_uint8
from tesserax.core.errors import TesseraxError

BORDER = 255  # white, so cells stay apart on the black background of digits


def save_grid(path, images, nrow: int, upscale: int = 1):
  """Writes images (float NHWC in [-1, 1], 1 or 3 channels) as a PNG grid of `nrow` per row.

  Each image is enlarged `upscale` times (nearest neighbour, for tiny images); cells are
  separated and surrounded by a 1-pixel white border, and empty cells of the last row are white.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise TesseraxError(f"save_grid needs images [N, H, W, 1 or 3], got shape {images.shape}")
  if not (isinstance(nrow, int) and nrow >= 1 and isinstance(upscale, int) and upscale >= 1):
    raise TesseraxError(f"nrow and upscale must be positive integers, got {nrow}, {upscale}")
  cells = to_uint8(images).repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, c = cells.shape
  rows = -(-n // nrow)
  grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), BORDER, np.uint8)
  for i, cell in enumerate(cells):
    top, left = 1 + (i // nrow) * (h + 1), 1 + (i % nrow) * (w + 1)
    grid[top:top + h, left:left + w] = cell
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid[..., 0] if c == 1 else grid).save(path, format="PNG")
