"""Tokenizer reconstructions of an evaluation set (`tesserax reconstruct` / `eval-recon`).

The protocol of LightningDiT evaluate_tokenizer.py: images resized (short side) and
center-cropped to 256 with torchvision's Resize + CenterCrop
(data/preprocess.py:resize_center_crop), mapped to [-1, 1], encoded deterministically (a KL
posterior's mean) and decoded; the reconstructions are clipped to [-1, 1] and quantised as PNGs
are (data/preprocess.py:to_uint8). Everything streams in batches, so a 50k-image ImageNet val
folder never sits in memory. Any tokenizer network (tokenizers/tokenizer.py's interface) serves.

  eval_set(data, resolution, ...)    uint8 [n, R, R, 3] batches of a folder or a dataset
  reconstruct(model, images)         jitted encode + decode over a mesh
  pairs(model, batches)              (originals uint8, reconstructions float) batches
  write_pairs(pairs, out_dir)        originals/NNNNN.png, reconstructions/NNNNN.png
"""
import concurrent.futures
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from tesserax.core import sharding
from tesserax.core.errors import TesseraxError
from tesserax.data import pipeline, preprocess
from tesserax.tokenizers import tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Prepared datasets and their held-out split (the default of --split).
DATASETS = {"digits": ("test", 10), "imagenet2012": ("validation", 1000)}
OFFICIAL_RESOLUTION = 256
GRID_PAIRS = 16
_LOG_EVERY_S = 10.0


def folder_paths(folder) -> list:
  """The .png/.jpg/.jpeg files under `folder` (recursive), sorted by relative path."""
  paths = []
  for root, _, names in os.walk(folder):
    paths.extend(os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES))
  if not paths:
    raise TesseraxError(f"no .png/.jpg/.jpeg images under {folder}")
  return sorted(paths, key=lambda p: os.path.relpath(p, folder))


def _read_folder(paths, resolution, batch_size):
  """uint8 batches of resize_center_crop'd images, decoded by a thread pool."""
  def load(path):
    try:
      with Image.open(path) as image:
        return preprocess.resize_center_crop(image, resolution)
    except OSError as e:
      raise TesseraxError(f"cannot read image {path}: {e}") from None

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    for start in range(0, len(paths), batch_size):
      yield np.stack(list(pool.map(load, paths[start:start + batch_size])))


def eval_set(data, resolution, *, split=None, data_dir="", num=None, batch_size=32):
  """(uint8 [n, R, R, 3] batches, total or None) of the evaluation set `data`: an image folder
  (read with resize_center_crop) or a prepared dataset name (digits, imagenet2012; default
  split the held-out one), 1-channel images tiled to RGB; at most `num` images."""
  if os.path.isdir(data):
    paths = folder_paths(data)[:num]
    return _read_folder(paths, resolution, batch_size), len(paths)
  if data not in DATASETS:
    raise TesseraxError(f"--data {data!r} is neither an image folder nor a dataset name "
                        f"({', '.join(DATASETS)})")
  default_split, num_classes = DATASETS[data]
  cfg = ml_collections.ConfigDict(dict(
      name=data, data_dir=data_dir, manual_dir="", resolution=resolution,
      split=split or default_split, random_flip=False, num_classes=num_classes))
  batches = pipeline.iterate_split(cfg, cfg.split, batch_size=batch_size, limit=num)
  return (np.repeat(b, 3, axis=-1) if b.shape[-1] == 1 else b for b in batches), num


def check_resolution(model, resolution):
  """Refuses a --resolution other than the tokenizer's input size."""
  if resolution != model.resolution:
    raise TesseraxError(f"--resolution {resolution} differs from the tokenizer's "
                        f"{model.resolution}; pass --resolution {model.resolution}")


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef, state, images):
  model = nnx.merge(graphdef, state)
  return jnp.clip(model.decode(model.encode(images)), -1.0, 1.0)


def reconstruct(model, images, batch_size=32, mesh=None) -> np.ndarray:
  """decode(encode(images)) (the deterministic encoding) clipped to [-1, 1] by the tokenizer
  network `model`, float32 [N, R, R, C].

  Fixed batches (sharding.map_batched: the last padded; batch_size rounded up to a multiple of
  the batch shards), each split over the batch axes of `mesh` (a training mesh: every process
  holds all `images`; default a mesh of the local devices) with the model replicated. A
  grayscale tokenizer (channels 1) given 3-channel (tiled) images takes their first channel
  and its reconstructions are tiled back to 3 channels.
  """
  images = np.asarray(images, np.float32)
  if not len(images):
    raise TesseraxError("no images to reconstruct")
  gray = model.channels == 1 and images.shape[-1] == 3
  if gray:
    images = images[..., :1]
  tokenizer.check_images(images, model.resolution, model.channels)
  if mesh is None:
    mesh = sharding.local_mesh()
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.replicated(mesh))
  out = sharding.map_batched(lambda x: _reconstruct(graphdef, state, x), (images,), batch_size,
                             mesh)
  return np.repeat(out, 3, axis=-1) if gray else out


def pairs(model, batches, batch_size=32, total=None, log=print):
  """(originals uint8, reconstructions float [-1, 1]) for each uint8 batch, with a progress
  line every 10 s and at the end."""
  start, last, done = time.time(), time.time(), 0
  for images in batches:
    yield images, reconstruct(model, preprocess.to_model_range(images), batch_size)
    done += len(images)
    if time.time() - last > _LOG_EVERY_S:
      last = time.time()
      rate = done / (last - start)
      eta = f", ETA {(total - done) / rate:.0f} s" if total else ""
      log(f"reconstructed {done}{f'/{total}' if total else ''} images, {rate:.1f} images/s{eta}")
  log(f"reconstructed {done} images in {time.time() - start:.1f} s")


def write_pairs(image_pairs, out_dir):
  """Writes out_dir/originals/NNNNN.png and out_dir/reconstructions/NNNNN.png (the same names,
  uint8). Returns (pair count, the first 16 pairs side by side, uint8 [n, R, 2R, 3])."""
  folders = [os.path.join(out_dir, k) for k in ("originals", "reconstructions")]
  for folder in folders:
    if os.path.isdir(folder) and os.listdir(folder):
      raise TesseraxError(f"{folder} is not empty; write into a new --out directory")
    os.makedirs(folder, exist_ok=True)

  def save(item):
    folder, name, image = item
    Image.fromarray(image).save(os.path.join(folder, name), format="PNG")

  count, side_by_side = 0, []
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    for originals, reconstructions in image_pairs:
      reconstructions = preprocess.to_uint8(reconstructions)
      names = [f"{count + i:05d}.png" for i in range(len(originals))]
      list(pool.map(save, [(folders[0], n, im) for n, im in zip(names, originals)] +
                    [(folders[1], n, im) for n, im in zip(names, reconstructions)]))
      keep = GRID_PAIRS - len(side_by_side)
      side_by_side.extend(np.concatenate([originals[:keep], reconstructions[:keep]], axis=2))
      count += len(originals)
  if not count:
    raise TesseraxError("no images to reconstruct")
  return count, np.stack(side_by_side)
