"""Tokenizer reconstructions of an evaluation set (`tesserax reconstruct` / `eval-recon`).

The protocol of LightningDiT evaluate_tokenizer.py: images resized (short side) and
center-cropped to 256 with torchvision's Resize + CenterCrop
(data/preprocess.py:resize_center_crop), mapped to [-1, 1], encoded deterministically (a KL
posterior's mean) and decoded; the reconstructions are clipped to [-1, 1] and quantised as PNGs
are (data/preprocess.py:to_uint8). Everything streams in batches, so a 50k-image ImageNet val
folder never sits in memory. Any tokenizer network (tokenizers/tokenizer.py's interface) serves.

  eval_set(data, resolution, ...)    uint8 [n, R, R, 3] batches of a folder or a dataset
  decode_settings(model, tokens, ..) a flexible-length tokenizer's decoding: the first K tokens,
                                     the decoder's steps and guidance (FlexTok)
  reconstruct(model, images)         jitted encode + decode over a mesh
  decode(model, ids)                 jitted decode of token ids over a mesh
  pairs(model, batches)              (originals uint8, reconstructions float) batches
  write_pairs(pairs, out_dir)        originals/NNNNN.png, reconstructions/NNNNN.png
"""
import concurrent.futures
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from tesserax.core import progress, sharding
from tesserax.core.errors import TesseraxError
from tesserax.data import pipeline, preprocess
from tesserax.tokenizers import tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Prepared datasets and their held-out split (the default of --split).
DATASETS = {"digits": ("test", 10), "imagenet2012": ("validation", 1000)}
OFFICIAL_RESOLUTION = 256
GRID_PAIRS = 16


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


MAX_TOKENS = 256  # FlexTok's register count, the longest flexible-length sequence
SETTINGS = ("tokens", "steps", "guidance_scale", "guidance")


def decode_settings(model, tokens=None, steps=None, guidance_scale=None, guidance=None) -> dict:
  """{setting: value} of the given ones among `tokens` (decode from the first K of an image's
  tokens, K in 1..min(256, the tokenizer's token count)), the decoder's `steps`,
  `guidance_scale` and `guidance` ("apg", "cfg"). Only a flexible-length tokenizer (FlexTok)
  takes any; anything else is refused in one line."""
  given = {k: v for k, v in zip(SETTINGS, (tokens, steps, guidance_scale, guidance))
           if v is not None}
  if given and not getattr(model, "flexible_length", False):
    raise TesseraxError(f"--{next(iter(given))} is for flexible-length tokenizers (FlexTok); "
                        f"this tokenizer decodes all its tokens in one pass")
  if tokens is not None:
    if not 1 <= tokens <= MAX_TOKENS:
      raise TesseraxError(f"--tokens {tokens} is outside 1..{MAX_TOKENS}")
    if tokens > model.num_registers:
      raise TesseraxError(f"--tokens {tokens}: this FlexTok has {model.num_registers} "
                          f"registers (tokens 1..{model.num_registers})")
  if steps is not None and steps < 1:
    raise TesseraxError(f"--steps must be positive, got {steps}")
  if guidance_scale is not None and guidance_scale < 0:
    raise TesseraxError(f"--guidance_scale must be >= 0, got {guidance_scale}")
  return given


def _decoded(model, ids, settings):
  settings = dict(settings)
  tokens = settings.pop("tokens", None)
  if tokens is not None:
    ids = ids[:, :tokens]
  return jnp.clip(model.decode(ids, **settings), -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _reconstruct(graphdef, state, images, settings):
  model = nnx.merge(graphdef, state)
  return _decoded(model, model.encode(images), settings)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(graphdef, state, ids, settings):
  return _decoded(nnx.merge(graphdef, state), ids, settings)


def _on_mesh(model, mesh):
  """(mesh, graphdef, state replicated over it); default mesh: the local devices."""
  mesh = sharding.local_mesh() if mesh is None else mesh
  graphdef, state = nnx.split(model)
  return mesh, graphdef, jax.device_put(state, sharding.replicated(mesh))


def decode(model, ids, batch_size=32, mesh=None, settings=None) -> np.ndarray:
  """Images float32 [N, R, R, C] clipped to [-1, 1] of host token ids [N, K] decoded by the
  tokenizer network `model` with `settings` (`decode_settings`), in batches over `mesh` as
  `reconstruct` runs. `model` is a flexible-length tokenizer (its `check_tokens` refuses ids
  outside its codebook in one line)."""
  ids = np.asarray(ids, np.int32)
  model.check_tokens(ids, None)
  mesh, graphdef, state = _on_mesh(model, mesh)
  items = tuple(sorted((settings or {}).items()))
  return sharding.map_batched(lambda z: _decode(graphdef, state, z, items),
                              (ids,), batch_size, mesh)


def reconstruct(model, images, batch_size=32, mesh=None, settings=None) -> np.ndarray:
  """decode(encode(images)) (the deterministic encoding) clipped to [-1, 1] by the tokenizer
  network `model`, float32 [N, R, R, C]; a flexible-length tokenizer decodes with `settings`
  (`decode_settings`: the first K tokens, the decoder's steps and guidance).

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
  mesh, graphdef, state = _on_mesh(model, mesh)
  items = tuple(sorted((settings or {}).items()))
  out = sharding.map_batched(lambda x: _reconstruct(graphdef, state, x, items), (images,),
                             batch_size, mesh)
  return np.repeat(out, 3, axis=-1) if gray else out


def pairs(model, batches, batch_size=32, total=None, log=print, settings=None):
  """(originals uint8, reconstructions float [-1, 1]) for each uint8 batch (decoded with
  `settings`), with a progress line every 10 s and at the end."""
  update, finish = progress.reporter("reconstructed", "images", total, log)
  for images in batches:
    yield images, reconstruct(model, preprocess.to_model_range(images), batch_size,
                              settings=settings)
    update(len(images))
  finish()


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
