"""Reference batches in the ADM evaluator's `.npz` format (openai/guided-diffusion evaluations/).

Keys: `arr_0` uint8 [N, H, W, 3] images (only precision/recall uses them; ADM ships 10,000),
`mu` [2048] / `sigma` [2048, 2048] the pool_3 statistics that define FID, `mu_s` [2023] /
`sigma_s` [2023, 2023] the sFID statistics. tesserax adds `mu_dinov2` [1024] /
`sigma_dinov2` [1024, 1024] for FD-DINOv2; ADM's own files do not have them. Statistics are
the float64 mean and the unbiased (N - 1) covariance, as np.cov.
"""
import os

import numpy as np

from tesserax.backbones import weights
from tesserax.backbones.inception import POOL_DIM, SPATIAL_DIM
from tesserax.core.errors import TesseraxError
from tesserax.core.files import atomic_output, one_line, read_npz
from tesserax.eval import metrics as metrics_lib

DINOV2_DIM = 1024
STAT_SHAPES = {
    "mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
    "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
    "mu_dinov2": (DINOV2_DIM,), "sigma_dinov2": (DINOV2_DIM, DINOV2_DIM),
}


def _check(name, key, value):
  if key == "arr_0":
    if value.dtype != np.uint8 or value.ndim != 4 or value.shape[-1] != 3:
      raise TesseraxError(
          f"{name}: arr_0 must be uint8 images [N, H, W, 3], got {value.dtype} {value.shape}")
    return
  if value.shape != STAT_SHAPES[key]:
    raise TesseraxError(f"{name}: {key} has shape {value.shape}, expected {STAT_SHAPES[key]}")
  if not np.all(np.isfinite(value)):
    raise TesseraxError(f"{name}: {key} contains NaN or Inf")


def load(path, metrics=("fid", "sfid", "is", "pr")) -> dict:
  """The reference arrays that `metrics` need, checked: {key: array}, statistics float64."""
  metrics = metrics_lib.check_metrics(metrics, metrics_lib.GENERATION_METRICS)

  def needed(names):
    for metric in metrics:
      for key in metrics_lib.REFERENCE_KEYS[metric]:
        if key not in names:
          raise TesseraxError(f"{path}: metric {metric!r} needs key {key!r}, which the file "
                              f"lacks (it has {', '.join(names)})")
    return list(dict.fromkeys(key for metric in metrics  # in order: one check order
                              for key in metrics_lib.REFERENCE_KEYS[metric]))

  ref = read_npz(path, "reference file", needed)
  for key, value in ref.items():
    if key != "arr_0":
      ref[key] = value.astype(np.float64)
    _check(path, key, ref[key])
  return ref


def save(path, ref: dict):
  """Writes {key: array} (any of arr_0 and the statistics) as an ADM-style .npz, atomically."""
  unknown = set(ref) - set(STAT_SHAPES) - {"arr_0"}
  if unknown:
    raise TesseraxError(f"unknown reference keys {sorted(unknown)}")
  for key, value in ref.items():
    _check(path, key, np.asarray(value))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_output(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **ref)


def compute(images, *, inception=None, dinov2=None, keep_images=10000, mode="adm",
            num_images=None, batch_size=100, mesh=None) -> dict:
  """Reference statistics of images: an array [N, H, W, 3] (uint8 or float [-1, 1]) or an
  iterable of batches, e.g. a tfds split, an image folder, or latents decoded by a
  tokenizer (this process's share).

  Returns {"mu", "sigma", "mu_s", "sigma_s"} from `inception` (default: weights.load),
  {"mu_dinov2", "sigma_dinov2"} if `dinov2` is given, and "arr_0": the first keep_images
  images (this process's). num_images: use exactly this many over all processes.
  """
  if inception is None:
    inception = weights.load("inception")
  acc = metrics_lib.accumulate(images, inception=inception, dinov2=dinov2, mode=mode,
                               num_samples=num_images, batch_size=batch_size, mesh=mesh,
                               keep_images=keep_images, name="reference images")
  ref = {"mu": acc["pool"].mean, "sigma": acc["pool"].cov,
         "mu_s": acc["spatial"].mean, "sigma_s": acc["spatial"].cov}
  if dinov2 is not None:
    ref["mu_dinov2"], ref["sigma_dinov2"] = acc["dinov2"].mean, acc["dinov2"].cov
  if keep_images:
    ref["arr_0"] = acc["images"]
  return ref


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path) -> np.ndarray:
  """uint8 RGB [H, W, 3] of a PNG/JPEG file; one TesseraxError if it cannot be decoded."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    raise TesseraxError(f"image {path} is truncated or corrupt ({one_line(e)})") from None


def read_images(path) -> np.ndarray:
  """uint8 NHWC RGB images from an ADM-style .npz (`arr_0`) or a folder of PNG/JPEG files
  (sorted by name, all of one size); an empty set is refused."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
      raise TesseraxError(f"no PNG/JPEG images in {path}")
    images = [read_image(os.path.join(path, n)) for n in names]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
      raise TesseraxError(f"images in {path} differ in size: {sorted(shapes)[:3]}")
    return np.stack(images)

  def arr_0(names):
    if "arr_0" not in names:
      raise TesseraxError(f"{path} has no arr_0 (the images)")
    return ["arr_0"]

  images = read_npz(path, "image batch", arr_0)["arr_0"]
  _check(path, "arr_0", images)
  if not len(images):
    raise TesseraxError(f"{path} holds no images (its arr_0 is empty)")
  return images
