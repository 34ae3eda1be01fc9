"""Encoding an image dataset into a cache (data/cache.py's format), and decoding a cache's
latents back to images.

  encode(tokenizer_dir, data_cfg, out_dir, ...)   image splits -> a cache (`tesserax data encode`)
  load_decoder(cache_dir) -> fn(normalised latents) -> images

Each example stores the tokenizer's stochastic encoding (for a KL tokenizer a posterior SAMPLE
mean + std * eps, as the extract_features.py scripts of LightningDiT and fast-DiT draw) of its
image (`latent`) and of the horizontally flipped image (`latent_flip`), which is how LightningDiT
does flip augmentation. The key of example `index` is
`fold_in(fold_in(PRNGKey(seed), index), flip)` with flip 0 or 1, so the cache depends on the
seed only, not on the device count, process count or batch size. Grayscale (1-channel) images
are tiled to the tokenizer's input channels (3 for RGB ones). A continuous tokenizer gives a
float32 cache with latent_stats.npz, a discrete one an int32 cache of token ids without.

A re-run skips complete shards and rewrites the others; a run that would encode anything else
(another tokenizer, dataset, seed, shard size) into the directory is refused.
"""
import collections
import concurrent.futures
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tesserax.core import sharding
from tesserax.core.errors import TesseraxError
from tesserax.data import cache
from tesserax.data import pipeline
from tesserax.data import preprocess
from tesserax.tokenizers import tokenizer as tokenizer_lib

_PREFETCH_BATCHES = 4


def _barrier(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _claim(out_dir, info, write):
  """Refuse an out_dir holding a cache of anything else; write cache.json where `write`."""
  path = os.path.join(out_dir, cache.INFO_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    differ = [k for k in info if old.get(k) != info[k]]
    if differ:
      raise TesseraxError(f"{out_dir} holds a latent cache of another {', '.join(differ)}; "
                          "encode into a new directory")
  elif write:
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(graphdef, state, images, indices, seed):
  """(encodings, encodings of the mirror images) [B, *latent_shape] of images [B, R, R, C] in
  [-1, 1] with indices [B], in one pass of the tokenizer."""
  n = images.shape[0]
  model = nnx.merge(graphdef, state)
  if images.shape[-1] != model.channels:  # grayscale images for an RGB tokenizer
    images = jnp.tile(images, (1, 1, 1, model.channels))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(indices)
  keys = jnp.concatenate([jax.vmap(lambda k, f=flip: jax.random.fold_in(k, f))(keys)
                          for flip in (0, 1)])
  z = model.encode(jnp.concatenate([images, images[:, :, ::-1]]), keys)
  return z[:n], z[n:]


def _prefetched(read, chunks):
  """read(chunk) for each chunk in order, computed up to _PREFETCH_BATCHES ahead on threads."""
  with concurrent.futures.ThreadPoolExecutor(_PREFETCH_BATCHES) as pool:
    pending = collections.deque()
    for chunk in chunks:
      pending.append(pool.submit(read, chunk))
      if len(pending) > _PREFETCH_BATCHES:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def encode(tokenizer_dir, data_cfg, out_dir, *, splits=("train",), batch_size: int = 64,
           shard_size: int = 5000, seed: int = 0, log=print) -> str:
  """Encode the image dataset of `data_cfg` (the pipeline's data config) into a cache at
  `out_dir` (see the module docstring); resumes an interrupted run. Process p of P encodes
  shards p, p + P, ... of each split, in batches of `batch_size` (rounded up to a multiple of
  its local device count) split over its local devices. Returns the absolute out_dir."""
  if data_cfg.name == cache.NAME:
    raise TesseraxError("data.name is latents; encode the image dataset the cache should hold")
  if batch_size < 1 or shard_size < 1:
    raise TesseraxError(f"batch size {batch_size} and shard size {shard_size} must be positive")
  out_dir = os.path.abspath(out_dir)
  tokenizer = tokenizer_lib.load(tokenizer_dir)
  model = tokenizer.model
  if data_cfg.resolution != model.resolution:
    raise TesseraxError(f"image resolution {data_cfg.resolution} differs from the tokenizer's "
                        f"{model.resolution}; set --resolution {model.resolution}")
  readers = {split: pipeline.image_reader(data_cfg, split) for split in splits}
  channels = readers[splits[0]][1]([0])[0].shape[-1]
  if channels not in (1, model.channels):
    raise TesseraxError(f"images with {channels} channels; the tokenizer takes "
                        f"{model.channels} (or 1, tiled)")
  info = {
      "tokenizer": {"dir": tokenizer.directory, "sha256": tokenizer.digest,
                    "kind": tokenizer.kind, "model": tokenizer.config.to_dict()},
      "data": {"name": data_cfg.name, "resolution": data_cfg.resolution,
               "data_dir": os.path.abspath(data_cfg.data_dir) if data_cfg.data_dir else "",
               "manual_dir": (os.path.abspath(data_cfg.manual_dir) if data_cfg.manual_dir
                              else "")},
      "seed": seed, "shard_size": shard_size, "latent_shape": list(model.latent_shape),
      "image_channels": int(channels),
  }
  if jax.process_index() == 0:
    _claim(out_dir, info, write=True)
  _barrier("tesserax latents claim")
  _claim(out_dir, info, write=False)

  mesh = sharding.local_mesh()
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.replicated(mesh))
  run = lambda images, indices: _encode_batch(graphdef, state, images, indices, seed)
  shards = sharding.batch_shards(mesh)
  padded_batch = -(-batch_size // shards) * shards
  features = cache.features(model.latent_shape, model.latent_dtype, data_cfg.num_classes)
  for split in splits:
    num_examples, read = readers[split]
    num_shards = -(-num_examples // shard_size)
    paths = cache.shard_paths(out_dir, split, num_shards)
    start_time, done = time.time(), 0
    for s in range(jax.process_index(), num_shards, jax.process_count()):
      if os.path.exists(paths[s]):
        continue
      first, last = s * shard_size, min((s + 1) * shard_size, num_examples)
      chunks = [np.arange(i, min(i + padded_batch, last)) for i in range(first, last,
                                                                         padded_batch)]

      def encoded(chunks=chunks):
        for indices, (images, labels) in zip(chunks, _prefetched(read, chunks)):
          z, z_flip = sharding.map_batched(
              run, (preprocess.to_model_range(images), indices.astype(np.int32)), padded_batch,
              mesh)
          yield z, z_flip, labels, indices

      cache.write_shard(paths[s], features, encoded())
      done += last - first
      log(f"latents {split}: shard {s + 1}/{num_shards} written ({done} examples by this "
          f"process, {done / (time.time() - start_time):.1f} examples/s)")

  _barrier("tesserax latents shards")
  if jax.process_index() == 0:
    complete = cache.complete_splits(out_dir)
    stats_split = "train" if "train" in complete else splits[0]
    if not model.is_discrete:
      np.savez(os.path.join(out_dir, cache.STATS_FILE),
               **cache.merged_stats(complete[stats_split][1]))
    cache.write_metadata(out_dir, features, complete,
                         f"{data_cfg.name} encoded by the tokenizer {tokenizer.directory}")
    log(f"{'token' if model.is_discrete else 'latent'} cache {out_dir}: splits "
        f"{', '.join(sorted(complete))}"
        + ("" if model.is_discrete else f", statistics of {stats_split}"))
  _barrier("tesserax latents metadata")
  return out_dir


def load_decoder(cache_dir, batch_size: int = 64):
  """fn(normalised latents or token ids [N, h, w, c]) -> host float32 images [N, R, R, C]
  clipped to [-1, 1] (tokenizer.Tokenizer.decode_normalized): the tokenizer a cache was encoded
  with, denormalising with the cache's statistics; C is the cache's image channels (1: grayscale
  images were tiled in, the mean of the decoded channels comes out)."""
  info = cache.read_info(cache_dir)
  tokenizer = tokenizer_lib.load(info["tokenizer"]["dir"])
  if not tokenizer.model.is_discrete:
    tokenizer.stats = cache.cache_stats(cache_dir)
  return functools.partial(tokenizer.decode_normalized, batch_size=batch_size,
                           image_channels=info["image_channels"])
