"""Caches: an image dataset encoded once by a tokenizer, the way LightningDiT and fast-DiT
train on pre-extracted latents. This module is the format and its read side;
tokenizers/cache_encoder.py writes caches (`tesserax data encode`) and data/pipeline.py serves
them as dataset `latents`.

A cache directory is a tfds dataset in array_record format (`tfds.builder_from_directory`):
  latents-SPLIT.array_record-XXXXX-of-YYYYY   shard s holds examples [s * shard_size,
      (s + 1) * shard_size) of the image split in order: `latent`, `latent_flip` (the encodings
      of the image and of its mirror image: float32 latents or int32 token ids of the
      tokenizer's latent shape), `label` (ClassLabel), `index` (int64, the example's index in
      the image split)
  <shard file>.stats.npz   its num_examples, and float64 count, sum, sumsq per channel of its
      unflipped latents (merged into latent_stats.npz); renamed into place before the shard
      file, whose presence marks a complete shard
  dataset_info.json, features.json   the tfds metadata, written once every shard is complete
  latent_stats.npz   float caches only: mean, std float32 [c] over N, H, W of the unflipped
      latents of split "train" when the cache holds it, else of the first split encoded
  cache.json   what was encoded: tokenizer (path, sha256 of params.npz, kind, config), image
      dataset, seed, shard size, latent shape, image channels
"""
import collections
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import naming

from tesserax.core.errors import TesseraxError

NAME = "latents"
INFO_FILE = "cache.json"
STATS_FILE = "latent_stats.npz"
_SHARD_STATS = ".stats.npz"


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


def features(latent_shape, latent_dtype, num_classes) -> tfds.features.FeaturesDict:
  """The tfds features of a cache's examples."""
  latent = tfds.features.Tensor(shape=tuple(latent_shape), dtype=latent_dtype,
                                encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict({
      "latent": latent, "latent_flip": latent,
      "label": tfds.features.ClassLabel(num_classes=num_classes),
      "index": tfds.features.Tensor(shape=(), dtype=np.int64)})


def shard_paths(cache_dir, split, num_shards) -> list:
  template = naming.ShardedFileTemplate(data_dir=cache_dir, dataset_name=NAME, split=split,
                                        filetype_suffix="array_record")
  return [os.fspath(p) for p in template.sharded_filepaths(num_shards)]


def write_shard(path, cache_features, batches):
  """Writes the records of `batches` ((latents, flipped, labels, indices) tuples) to `path`
  and its per-channel statistics sidecar; both appear under their names only when complete."""
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
  n, count, total, total_sq = 0, 0, 0.0, 0.0
  for z, z_flip, labels, indices in batches:
    for i in range(len(z)):
      writer.write(cache_features.serialize_example(
          {"latent": z[i], "latent_flip": z_flip[i], "label": labels[i], "index": indices[i]}))
    z64 = z.astype(np.float64).reshape(-1, z.shape[-1])
    n, count = n + len(z), count + len(z64)
    total, total_sq = total + z64.sum(0), total_sq + (z64 ** 2).sum(0)
  writer.close()
  with open(path + _SHARD_STATS + ".tmp", "wb") as f:
    np.savez(f, num_examples=n, count=count, sum=total, sumsq=total_sq)
  os.replace(path + _SHARD_STATS + ".tmp", path + _SHARD_STATS)
  os.replace(path + ".tmp", path)  # last: its presence marks a complete shard


def complete_splits(cache_dir) -> dict:
  """{split: (shard lengths, shard paths)} of the splits whose shards are all complete."""
  found = collections.defaultdict(set)
  template = naming.ShardedFileTemplate(data_dir=cache_dir)
  for name in os.listdir(cache_dir):
    if (info := template.parse_filename_info(name)) is not None:
      found[info.split].add((info.shard_index, info.num_shards))
  splits = {}
  for split, shards in found.items():
    num_shards = max(y for _, y in shards)
    if shards != {(i, num_shards) for i in range(num_shards)}:
      raise TesseraxError(f"split {split} of the cache {cache_dir} is incomplete; re-run "
                          f"`tesserax data encode` with --splits {split} to complete it")
    paths = shard_paths(cache_dir, split, num_shards)
    lengths = []
    for path in paths:
      with np.load(path + _SHARD_STATS) as f:
        lengths.append(int(f["num_examples"]))
    splits[split] = (lengths, paths)
  return splits


def merged_stats(paths) -> dict:
  """Per-channel mean and std of the shards at `paths` (float64 sums of their sidecars) as
  float32."""
  count, total, total_sq = 0, 0.0, 0.0
  for path in paths:
    with np.load(path + _SHARD_STATS) as f:
      count, total, total_sq = count + f["count"], total + f["sum"], total_sq + f["sumsq"]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


def write_metadata(cache_dir, cache_features, splits, description):
  """The tfds metadata of the complete `splits` ({split: (shard lengths, shard paths)}): what
  makes the directory a cache."""
  split_infos = [tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                     num_bytes=sum(os.path.getsize(p) for p in paths))
                 for split, (lengths, paths) in sorted(splits.items())]
  tfds.folder_dataset.write_metadata(
      data_dir=cache_dir, features=cache_features, split_infos=split_infos,
      filename_template=naming.ShardedFileTemplate(data_dir=cache_dir), check_data=False,
      description=description)
