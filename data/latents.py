"""Latent caches: an image dataset encoded once by a KL tokenizer, the way LightningDiT and
fast-DiT train on pre-extracted latents (reference/generators.md).

  encode(tokenizer_dir, data_cfg, out_dir, ...)   image splits -> a cache (`tesserax data encode`)
  load_decoder(cache_dir) -> fn(normalised latents) -> images
  cache_stats(cache_dir), read_info(cache_dir), open_cache(cache_dir)

Each example stores a posterior SAMPLE mean + std * eps, as the LightningDiT and fast-DiT
extraction scripts draw, of its image (`latent`) and of the horizontally flipped image
(`latent_flip`), which is how LightningDiT does flip augmentation. eps of example `index` is
`normal(fold_in(fold_in(PRNGKey(seed), index), flip), latent_shape)` with flip 0 or 1, so the
cache depends on the seed only, not on the device count, process count or batch size.
Grayscale (1-channel) images are tiled to the tokenizer's input channels (3 for RGB ones).

A cache directory is a tfds dataset in array_record format (`tfds.builder_from_directory`):
  latents-SPLIT.array_record-XXXXX-of-YYYYY   shard s holds examples [s * shard_size,
      (s + 1) * shard_size) of the image split in order: `latent`, `latent_flip` (float32
      [h, w, c]), `label` (ClassLabel), `index` (int64, the example's index in the image split)
  <shard file>.stats.npz   float64 count, sum, sumsq per channel of the shard's unflipped
      latents, and its num_examples; renamed into place before the shard file, whose presence
      marks a complete shard (a re-run skips complete shards, rewrites the others)
  dataset_info.json, features.json   the tfds metadata, written once every shard is complete
  latent_stats.npz   mean, std float32 [c] over N, H, W of the unflipped latents of split
      "train" when the cache holds it, else of the first split encoded in this run
  cache.json   what was encoded: tokenizer (path, sha256 of params.npz, kind, config), image
      dataset, seed, shard size, latent shape, image channels; a run that would encode
      anything else into the directory is refused.
"""
import collections
import concurrent.futures
import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorflow_datasets.core import naming

from tesserax.convert import vae
from tesserax.data import pipeline
from tesserax.data import preprocess
from tesserax.errors import TesseraxError
from tesserax.tokenizers import kl_autoencoder
from tesserax.training import sharding

NAME = "latents"
INFO_FILE = "cache.json"
STATS_FILE = "latent_stats.npz"
_SHARD_STATS = ".stats.npz"
_PREFETCH_BATCHES = 4


def read_info(cache_dir) -> dict:
  """The cache.json of a cache directory."""
  path = os.path.join(cache_dir, INFO_FILE)
  if not os.path.exists(path):
    raise TesseraxError(f"{cache_dir} is not a latent cache (no {INFO_FILE}); write one with "
                        "`tesserax data encode NAME --tokenizer DIR --out CACHE`")
  with open(path) as f:
    return json.load(f)


def cache_stats(cache_dir) -> dict:
  """{"mean", "std"} float32 [c]: the per-channel statistics latents are normalised with."""
  path = os.path.join(cache_dir, STATS_FILE)
  if not os.path.exists(path):
    raise TesseraxError(f"{cache_dir} has no {STATS_FILE}: its encode did not finish; re-run "
                        "`tesserax data encode` with the same arguments to complete it")
  with np.load(path) as f:
    return {k: f[k].astype(np.float32) for k in ("mean", "std")}


def image_data_config(cache_dir):
  """The data config of the image dataset a cache was encoded from (for image-space metrics
  and the real-data floor of a generator trained on the cache)."""
  import ml_collections
  data = read_info(cache_dir)["data"]
  num_classes = open_cache(cache_dir).info.features["label"].num_classes
  return ml_collections.ConfigDict(dict(data, split="train", random_flip=False,
                                        num_classes=num_classes))


def open_cache(cache_dir):
  """The read-only tfds builder of a complete cache directory."""
  if not cache_dir or not os.path.exists(os.path.join(cache_dir, "dataset_info.json")):
    raise TesseraxError(f"no complete latent cache in {cache_dir!r} (data.data_dir); write it "
                        "with `tesserax data encode NAME --tokenizer DIR --out CACHE`")
  return tfds.builder_from_directory(cache_dir)


def _padded(x, size):
  """x with its leading dimension padded to `size` by repeating its last row."""
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)]) if len(x) < size else x


def _barrier(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _features(latent_shape, num_classes):
  latent = tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float32,
                                encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict({
      "latent": latent, "latent_flip": latent,
      "label": tfds.features.ClassLabel(num_classes=num_classes),
      "index": tfds.features.Tensor(shape=(), dtype=np.int64)})


def _load_tokenizer(tokenizer_dir):
  """(model, config.json contents, sha256 of params.npz) of a tokenizer directory."""
  if not os.path.isdir(tokenizer_dir):
    raise TesseraxError(f"tokenizer directory not found: {tokenizer_dir}")
  model, _ = vae.load_tokenizer(tokenizer_dir)
  with open(os.path.join(tokenizer_dir, "config.json")) as f:
    config = json.load(f)
  digest = hashlib.sha256()
  with open(os.path.join(tokenizer_dir, "params.npz"), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return model, config, digest.hexdigest()


def _claim(out_dir, info, write):
  """Refuse an out_dir holding a cache of anything else; write cache.json where `write`."""
  path = os.path.join(out_dir, INFO_FILE)
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
  """(latents, flipped latents) [B, h, w, c] of images [B, R, R, C] in [-1, 1] with indices
  [B]: one posterior pass over the images and their mirror images."""
  n = images.shape[0]
  model = nnx.merge(graphdef, state)
  if images.shape[-1] != model.channels:  # grayscale images for an RGB tokenizer
    images = jnp.tile(images, (1, 1, 1, model.channels))
  mean, logvar = model.posterior(jnp.concatenate([images, images[:, :, ::-1]]))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(indices)
  keys = jnp.concatenate([jax.vmap(lambda k, f=flip: jax.random.fold_in(k, f))(keys)
                          for flip in (0, 1)])
  z = jax.vmap(kl_autoencoder.sample)(mean, logvar, keys)
  return z[:n], z[n:]


def _encoder(model, mesh, seed):
  """(images [B, R, R, C] in [-1, 1], indices [B]) -> host (latents, flipped latents), the
  batch split over `mesh`."""
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = NamedSharding(mesh, P(sharding.BATCH_AXES))

  def run(images, indices):
    z, z_flip = _encode_batch(graphdef, state, jax.device_put(images, batch),
                              jax.device_put(indices.astype(np.int32), batch), seed)
    return np.asarray(z), np.asarray(z_flip)

  return run


def _write_shard(path, features, batches):
  """Write the records of `batches` ((latents, flipped, labels, indices) tuples) to `path`
  and its per-channel statistics sidecar; both appear under their names only when complete."""
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
  n, count, total, total_sq = 0, 0, 0.0, 0.0
  for z, z_flip, labels, indices in batches:
    for i in range(len(z)):
      writer.write(features.serialize_example({"latent": z[i], "latent_flip": z_flip[i],
                                               "label": labels[i], "index": indices[i]}))
    z64 = z.astype(np.float64).reshape(-1, z.shape[-1])
    n, count = n + len(z), count + len(z64)
    total, total_sq = total + z64.sum(0), total_sq + (z64 ** 2).sum(0)
  writer.close()
  with open(path + _SHARD_STATS + ".tmp", "wb") as f:
    np.savez(f, num_examples=n, count=count, sum=total, sumsq=total_sq)
  os.replace(path + _SHARD_STATS + ".tmp", path + _SHARD_STATS)
  os.replace(path + ".tmp", path)  # last: its presence marks a complete shard


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


def _shard_paths(out_dir, split, num_shards):
  template = naming.ShardedFileTemplate(data_dir=out_dir, dataset_name=NAME, split=split,
                                        filetype_suffix="array_record")
  return [os.fspath(p) for p in template.sharded_filepaths(num_shards)]


def _complete_splits(out_dir):
  """{split: (shard lengths, shard paths)} of the splits whose shards are all complete."""
  found = collections.defaultdict(set)
  template = naming.ShardedFileTemplate(data_dir=out_dir)
  for name in os.listdir(out_dir):
    if (info := template.parse_filename_info(name)) is not None:
      found[info.split].add((info.shard_index, info.num_shards))
  splits = {}
  for split, shards in found.items():
    num_shards = max(y for _, y in shards)
    if shards != {(i, num_shards) for i in range(num_shards)}:
      raise TesseraxError(f"split {split} of the cache {out_dir} is incomplete; re-run "
                          f"`tesserax data encode` with --splits {split} to complete it")
    paths = _shard_paths(out_dir, split, num_shards)
    lengths = []
    for path in paths:
      with np.load(path + _SHARD_STATS) as f:
        lengths.append(int(f["num_examples"]))
    splits[split] = (lengths, paths)
  return splits


def _merged_stats(paths):
  """Per-channel mean and std (float64 sums of the shard sidecars) as float32."""
  count, total, total_sq = 0, 0.0, 0.0
  for path in paths:
    with np.load(path + _SHARD_STATS) as f:
      count, total, total_sq = count + f["count"], total + f["sum"], total_sq + f["sumsq"]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


def encode(tokenizer_dir, data_cfg, out_dir, *, splits=("train",), batch_size: int = 64,
           shard_size: int = 5000, seed: int = 0, log=print) -> str:
  """Encode the image dataset of `data_cfg` (the pipeline's data config) into a latent cache
  at `out_dir` (see the module docstring); resumes an interrupted run. Process p of P encodes
  shards p, p + P, ... of each split, in batches of `batch_size` (rounded up to a multiple of
  its local device count) split over its local devices. Returns the absolute out_dir."""
  if data_cfg.name == NAME:
    raise TesseraxError("data.name is latents; encode the image dataset the cache should hold")
  if batch_size < 1 or shard_size < 1:
    raise TesseraxError(f"batch size {batch_size} and shard size {shard_size} must be positive")
  out_dir = os.path.abspath(out_dir)
  tokenizer_dir = os.path.abspath(tokenizer_dir)
  model, tokenizer, digest = _load_tokenizer(tokenizer_dir)
  if data_cfg.resolution != model.resolution:
    raise TesseraxError(f"image resolution {data_cfg.resolution} differs from the tokenizer's "
                        f"{model.resolution}; set --resolution {model.resolution}")
  readers = {split: pipeline.image_reader(data_cfg, split) for split in splits}
  channels = readers[splits[0]][1]([0])[0].shape[-1]
  if channels not in (1, model.channels):
    raise TesseraxError(f"images with {channels} channels; the tokenizer takes "
                        f"{model.channels} (or 1, tiled)")
  info = {
      "tokenizer": {"dir": tokenizer_dir, "sha256": digest, **tokenizer},
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
  run = _encoder(model, mesh, seed)
  padded_batch = -(-batch_size // mesh.size) * mesh.size
  features = _features(model.latent_shape, data_cfg.num_classes)
  for split in splits:
    num_examples, read = readers[split]
    num_shards = -(-num_examples // shard_size)
    paths = _shard_paths(out_dir, split, num_shards)
    start_time, done = time.time(), 0
    for s in range(jax.process_index(), num_shards, jax.process_count()):
      if os.path.exists(paths[s]):
        continue
      first, last = s * shard_size, min((s + 1) * shard_size, num_examples)
      chunks = [np.arange(i, min(i + padded_batch, last)) for i in range(first, last,
                                                                         padded_batch)]

      def encoded(chunks=chunks):
        for indices, (images, labels) in zip(chunks, _prefetched(read, chunks)):
          z, z_flip = run(_padded(preprocess.to_model_range(images), padded_batch),
                          _padded(indices, padded_batch))
          yield z[:len(indices)], z_flip[:len(indices)], labels, indices

      _write_shard(paths[s], features, encoded())
      done += last - first
      log(f"latents {split}: shard {s + 1}/{num_shards} written ({done} examples by this "
          f"process, {done / (time.time() - start_time):.1f} examples/s)")

  _barrier("tesserax latents shards")
  if jax.process_index() == 0:
    complete = _complete_splits(out_dir)
    stats_split = "train" if "train" in complete else splits[0]
    np.savez(os.path.join(out_dir, STATS_FILE), **_merged_stats(complete[stats_split][1]))
    split_infos = [tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                       num_bytes=sum(os.path.getsize(p) for p in paths))
                   for split, (lengths, paths) in sorted(complete.items())]
    tfds.folder_dataset.write_metadata(
        data_dir=out_dir, features=features, split_infos=split_infos,
        filename_template=naming.ShardedFileTemplate(data_dir=out_dir), check_data=False,
        description=f"{data_cfg.name} encoded by the tokenizer {tokenizer_dir}")
    log(f"latent cache {out_dir}: splits {', '.join(sorted(complete))}, statistics of "
        f"{stats_split}")
  _barrier("tesserax latents metadata")
  return out_dir


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode_batch(graphdef, gray, state, latents, stats):
  """Images in [-1, 1] of normalised latents; grayscale: the mean of the decoded channels."""
  images = nnx.merge(graphdef, state).decode(latents * stats["std"] + stats["mean"])
  images = jnp.clip(images, -1.0, 1.0)
  return images.mean(-1, keepdims=True) if gray else images


def make_decoder(model, stats, image_channels=None, batch_size: int = 64):
  """fn(normalised latents, host float32 [N, h, w, c]) -> host float32 images [N, R, R, C]
  clipped to [-1, 1]: latents * std + mean decoded by the KL tokenizer `model`, in jitted
  batches sharded over the local devices. C is `image_channels` (default the tokenizer's): 1
  for grayscale images tiled for an RGB tokenizer gives the mean of the decoded channels."""
  mesh = sharding.local_mesh()
  padded_batch = -(-batch_size // mesh.size) * mesh.size
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
  gray = image_channels not in (None, model.channels)
  stats = {k: np.asarray(stats[k], np.float32) for k in ("mean", "std")}

  def decode(latents):
    latents = np.asarray(latents, np.float32)
    if latents.shape[1:] != tuple(model.latent_shape):
      raise TesseraxError(f"latents of shape {latents.shape[1:]}; the tokenizer decodes "
                          f"{tuple(model.latent_shape)}")
    out = []
    for i in range(0, len(latents), padded_batch):
      chunk = latents[i:i + padded_batch]
      images = _decode_batch(graphdef, gray, state,
                             jax.device_put(_padded(chunk, padded_batch), batch), stats)
      out.append(np.asarray(images)[:len(chunk)])
    return np.concatenate(out)

  return decode


def load_decoder(cache_dir, batch_size: int = 64):
  """make_decoder for the tokenizer, statistics and image channels of a cache."""
  info = read_info(cache_dir)
  model, _ = vae.load_tokenizer(info["tokenizer"]["dir"])
  return make_decoder(model, cache_stats(cache_dir), info["image_channels"], batch_size)
