"""The data API of the trainer: prepare a dataset, load a split whole, or stream global batches.

Datasets are prepared by the tfds builders of data/builders.py in array_record format and read
with random access. The training stream is deterministic and independent of the process count:
epoch e is `np.random.default_rng([seed, e]).permutation(N)`, global batch b holds the global
positions [b*B, (b+1)*B) of the concatenated epochs, and process p of P reads only rows
[p*B/P, (p+1)*B/P) of each global batch. The horizontal flip of each position is drawn from the
same generator as its epoch's permutation, so flips do not depend on P either.

Dataset `latents` is a cache (data/cache.py, written by `tesserax data encode`), with
data.data_dir the cache directory. It serves the stored float latents normalised per channel
with the cache's statistics, (z - mean) / std, or the stored token ids as int32, as "image"; a
flipped position serves the stored encoding of the flipped image (`latent_flip`), so the same
flip decisions apply without mirroring arrays.

Dataset `pairs` is a pair cache (data/pairs.py, written by `tesserax pairs`), with data.data_dir
the cache directory: batches {"noise", "image", "label"} of a trained model's (noise, sample)
pairs, stored float32 in the model's space, for reflow and distillation (objectives/reflow.py,
objectives/slimflow.py). A flipped position mirrors noise and sample together (SlimFlow's
`h_flip`). The task checks that the run's teacher made the cache (tasks/diffusion.py).
"""
import functools
import os
import sys

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from tesserax.data import builders
from tesserax.data import cache
from tesserax.data import pairs
from tesserax.data import preprocess
from tesserax.core.errors import TesseraxError

DATASETS = ("digits", "image_folder", "imagenet2012", "latents", "pairs")
# Datasets written by tesserax commands, not built: their feature holding the model input.
_CACHES = {"latents": "latent", "pairs": "image"}
_MANUAL_CONTENTS = {
    "image_folder": "one subfolder of .png/.jpg/.jpeg images per class",
    "imagenet2012": f"{builders.IMAGENET_TRAIN_TAR} and {builders.IMAGENET_VAL_TAR}",
}
# Batches loaded ahead, each by its own thread (PIL decodes PNGs without holding the GIL).
_PREFETCH_BATCHES = 4


def _builder(name, data_dir, manual_dir, resolution):
  """The tfds builder of dataset `name`; '' or None data_dir means the tfds default."""
  data_dir = data_dir or None
  if name == "digits":
    return builders.TesseraxDigits(data_dir=data_dir)
  if name == "image_folder":
    if not manual_dir:
      raise TesseraxError("image_folder needs manual_dir, the image folder (it also names the "
                          "prepared dataset); set data.manual_dir / --manual_dir")
    return builders.TesseraxImageFolder(
        config=builders.image_folder_config(manual_dir, resolution), data_dir=data_dir)
  if name == "imagenet2012":
    if resolution not in builders.IMAGENET_RESOLUTIONS:
      raise TesseraxError(f"imagenet2012 resolution {resolution} is not one of "
                          f"{builders.IMAGENET_RESOLUTIONS}; set the resolution to one of them")
    return builders.TesseraxImagenet2012(config=str(resolution), data_dir=data_dir)
  if name == "latents":
    return cache.open_cache(data_dir)
  if name == "pairs":
    return pairs.open_pairs(data_dir)
  raise TesseraxError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def build(name: str, data_dir: str, manual_dir: str | None = None,
          resolution: int | None = None) -> None:
  """Prepares dataset `name` under `data_dir` in array_record format (`tesserax data build`).

  digits needs neither `manual_dir` nor `resolution` (it is resized when served).
  """
  if name == "latents":
    raise TesseraxError("latent caches are not built but encoded from an image dataset: run "
                        "`tesserax data encode NAME --tokenizer DIR --out CACHE`")
  if name == "pairs":
    raise TesseraxError("pair caches are not built but sampled from a trained model: run "
                        "`tesserax pairs --workdir TEACHER --out CACHE --num N`")
  if name in _MANUAL_CONTENTS:
    contents = _MANUAL_CONTENTS[name]
    if not manual_dir:
      raise TesseraxError(f"{name} needs --manual_dir, a directory with {contents}")
    if resolution is None:
      raise TesseraxError(f"{name} needs --resolution, the side of the stored center crops")
    if not os.path.isdir(manual_dir):
      raise TesseraxError(f"{name} manual_dir not found: {manual_dir}; it should hold {contents}")
    if not os.listdir(manual_dir):
      raise TesseraxError(f"{name} manual_dir is empty: {manual_dir}; it should hold {contents}")
  builder = _builder(name, data_dir, manual_dir, resolution)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def _source(data_cfg, split):
  """The random-access tfds source of `split`; digits is prepared here on first use."""
  name = data_cfg.name
  builder = _builder(name, data_cfg.data_dir, data_cfg.manual_dir, data_cfg.resolution)
  if name in _CACHES:
    shape = builder.info.features[_CACHES[name]].shape
    if data_cfg.resolution != shape[0]:
      what = "latent cache" if name == "latents" else "pair cache"
      held = "latents" if name == "latents" else "samples"
      raise TesseraxError(f"data.resolution is {data_cfg.resolution} but the {what} "
                          f"{data_cfg.data_dir} holds {held} of shape {list(shape)}; set "
                          f"data.resolution={shape[0]}")
  elif not builder.is_prepared():
    if name != "digits":
      raise TesseraxError(
          f"dataset {name} is not prepared at resolution {data_cfg.resolution} in "
          f"{builder.data_dir}; run `tesserax data build {name} --manual_dir "
          f"{data_cfg.manual_dir or 'DIR'} --resolution {data_cfg.resolution}`")
    builder.download_and_prepare(file_format="array_record")
  if split not in builder.info.splits:
    raise TesseraxError(f"dataset {name} has no split {split!r}; choose one of "
                        f"{', '.join(sorted(builder.info.splits))}")
  num_classes = builder.info.features["label"].num_classes
  if num_classes != data_cfg.num_classes:
    raise TesseraxError(f"data.num_classes is {data_cfg.num_classes} but dataset {name} has "
                        f"{num_classes} classes; set data.num_classes={num_classes}")
  return builder.as_data_source(split)


def _read(source, indices):
  """uint8 images [n, h, w, c] and int32 labels [n] of the examples at `indices`."""
  examples = source.__getitems__(indices)  # one batched array_record read
  images = np.stack([ex["image"] for ex in examples])
  return images, np.array([ex["label"] for ex in examples], np.int32)


def _input_reader(data_cfg, source):
  """read(indices, flips=None) -> the batch {"image": model inputs [n, ...], "label": int32
  [n]} of the examples at `indices`: float32 images in [-1, 1] at data_cfg.resolution,
  mirrored where `flips` (bool [n]); or a cache's float32 normalised latents or int32 token
  ids, the stored flipped ones where `flips`; or a pair cache's float32 samples with their
  noise ("noise"), both mirrored where `flips`."""
  if data_cfg.name == "pairs":

    def read_pairs(indices, flips=None):
      examples = source.__getitems__(indices)
      batch = {k: np.stack([ex[k] for ex in examples]) for k in ("noise", "image")}
      if flips is not None:
        batch = {k: np.where(flips[:, None, None, None], v[:, :, ::-1], v)
                 for k, v in batch.items()}
      return dict(batch, label=np.array([ex["label"] for ex in examples], np.int32))

    return read_pairs

  if data_cfg.name == "latents":
    discrete = np.issubdtype(source.dataset_info.features["latent"].np_dtype, np.integer)
    stats = None if discrete else cache.cache_stats(data_cfg.data_dir)

    def read_latents(indices, flips=None):
      examples = source.__getitems__(indices)
      flips = np.zeros(len(examples), bool) if flips is None else flips
      z = np.stack([ex["latent_flip" if f else "latent"] for ex, f in zip(examples, flips)])
      labels = np.array([ex["label"] for ex in examples], np.int32)
      if discrete:
        return {"image": z.astype(np.int32), "label": labels}
      return {"image": ((z - stats["mean"]) / stats["std"]).astype(np.float32), "label": labels}

    return read_latents

  def read_images(indices, flips=None):
    images, labels = _read(source, indices)
    images = _at_resolution(images, data_cfg)
    if flips is not None:
      images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return {"image": preprocess.to_model_range(images), "label": labels}

  return read_images


def image_reader(data_cfg, split):
  """(number of examples, read) of an image split, where read(indices) gives uint8 images
  [n, R, R, C] at data_cfg.resolution and int32 labels [n] (what tokenizers/cache_encoder.py
  encodes)."""
  if data_cfg.name == "latents":
    raise TesseraxError("dataset latents holds latents, not images; name the image dataset "
                        "the cache was encoded from")
  if data_cfg.name == "pairs":
    raise TesseraxError("dataset pairs holds a model's (noise, sample) pairs, not images; name "
                        "an image dataset")
  source = _source(data_cfg, split)

  def read(indices):
    images, labels = _read(source, np.asarray(indices).tolist())
    return _at_resolution(images, data_cfg), labels

  return len(source), read


def _at_resolution(images, data_cfg):
  """Stored uint8 images at data_cfg.resolution: digits is resized, the others are stored so."""
  if data_cfg.name == "digits":
    return preprocess.resize_uint8(images, data_cfg.resolution)
  return images


def image_config(data_cfg):
  """data_cfg itself for image datasets and pair caches (whose samples are images at
  data_cfg.resolution); for a latent cache, the image dataset it encodes."""
  return cache.image_data_config(data_cfg.data_dir) if data_cfg.name == "latents" else data_cfg


def load_split(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole of `split` in memory: float32 NHWC images in [-1, 1] (or a cache's normalised
  latents or token ids, or a pair cache's samples) and int32 labels."""
  source = _source(data_cfg, split)
  batch = _input_reader(data_cfg, source)(list(range(len(source))))
  return batch["image"], batch["label"]


def iterate_split(data_cfg, split: str, batch_size: int = 256, limit: int | None = None):
  """uint8 NHWC image batches of `split` in order, at data_cfg.resolution (for reference
  statistics of datasets too large to hold in memory); at most `limit` images."""
  num_examples, read = image_reader(data_cfg, split)
  total = num_examples if limit is None else min(limit, num_examples)
  for start in range(0, total, batch_size):
    yield read(range(start, min(start + batch_size, total)))[0]


def make_train_loader(data_cfg, global_batch_size: int, seed: int,
                      process_index: int | None = None, process_count: int | None = None):
  """An endless grain iterator of this process's rows of each global batch of data_cfg.split.

  Yields {'image': float32 [B/P, R, R, C] in [-1, 1] (for dataset latents normalised float32
  latents or int32 token ids [B/P, h, w, c]), 'label': int32 [B/P]}, and for dataset pairs
  'noise' (float32, the shape of 'image') as well. Its state is
  grain's `get_state()` / `set_state()` ({'next_index': number of batches served}).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise TesseraxError(f"global batch size {global_batch_size} is not divisible by the "
                        f"{process_count} processes; choose a multiple of {process_count}")
  source = _source(data_cfg, data_cfg.split)
  read = _input_reader(data_cfg, source)
  num_examples = len(source)
  local_batch_size = global_batch_size // process_count

  @functools.lru_cache(maxsize=4)
  def epoch(e):
    """(example order, flip decisions) of epoch e, both indexed by position within the epoch."""
    rng = np.random.default_rng([seed, e])
    order = rng.permutation(num_examples)
    return order, rng.random(num_examples) < 0.5

  def load_local_batch(b):
    """This process's rows [p*B/P, (p+1)*B/P) of global batch b."""
    first = b * global_batch_size + process_index * local_batch_size
    epochs, within = np.divmod(np.arange(first, first + local_batch_size), num_examples)
    indices = np.empty(local_batch_size, np.int64)
    flips = np.empty(local_batch_size, bool)
    for e in np.unique(epochs):
      order, flip = epoch(int(e))
      rows = epochs == e
      indices[rows] = order[within[rows]]
      flips[rows] = flip[within[rows]]
    return read(indices.tolist(), flips if data_cfg.random_flip else None)

  read_options = grain.ReadOptions(num_threads=_PREFETCH_BATCHES,
                                   prefetch_buffer_size=_PREFETCH_BATCHES)
  batches = grain.MapDataset.range(sys.maxsize).map(load_local_batch)
  return iter(batches.to_iter_dataset(read_options))
