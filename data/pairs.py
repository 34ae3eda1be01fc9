"""Pair caches: (noise, teacher sample) pairs for reflow and distillation (Liu et al. 2023,
gnobitab/RectifiedFlow's reflow data; 2-RF++ and SlimFlow's pairs from a pretrained model).

  generate(sample, out_dir, ...)      writes a cache with any `sample(noise, labels) -> x0`
  check(cache_dir, maker, shape)      refuses, in one line, a cache another model made
  load(cache_dir) -> dict             the whole cache in memory, in pair order

`tesserax pairs` writes a cache from a trained generator (tasks/diffusion.py `write_pairs`);
data/pipeline.py serves it as dataset `pairs`.

A pair cache is a tfds dataset in array_record format, like the latent caches of
data/cache.py (whose metadata writer it uses):
  pairs-train.array_record-XXXXX-of-YYYYY   shard s holds pairs [s * shard_size,
      (s + 1) * shard_size): `noise` and `image` (float32 of the sample shape), `label`
      (ClassLabel), `index` (int64); written under a temporary name and renamed into place
      when complete, so its presence marks a complete shard
  dataset_info.json, features.json   written once every shard is complete
  pairs.json   what made the pairs: `maker` (the caller's description of the teacher and its
      solver: workdir, checkpoint step, sampler, steps, guidance, ...), sample shape, number
      of classes, seed, number of pairs, shard size

Pair i starts from the noise normal(fold_in(PRNGKey(seed), i)) with label i mod num_classes, so
a cache depends on its seed only, not on the device count, process count or batch size. Process
p of P writes shards p, p + P, ...; each batch is split over its local devices. A re-run skips
complete shards and rewrites the others (a killed run resumes); a run that would write pairs of
anything else into the directory is refused.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import naming

from tesserax.core import progress, sharding
from tesserax.core.errors import TesseraxError
from tesserax.data import cache

NAME = "pairs"
SPLIT = "train"
INFO_FILE = "pairs.json"


def _barrier(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def features(shape, num_classes) -> tfds.features.FeaturesDict:
  sample = tfds.features.Tensor(shape=tuple(shape), dtype=np.float32,
                                encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict({
      "noise": sample, "image": sample,
      "label": tfds.features.ClassLabel(num_classes=num_classes),
      "index": tfds.features.Tensor(shape=(), dtype=np.int64)})


def shard_paths(cache_dir, num_shards) -> list:
  template = naming.ShardedFileTemplate(data_dir=cache_dir, dataset_name=NAME, split=SPLIT,
                                        filetype_suffix="array_record")
  return [os.fspath(p) for p in template.sharded_filepaths(num_shards)]


def read_info(cache_dir) -> dict:
  path = os.path.join(cache_dir, INFO_FILE)
  if not os.path.exists(path):
    raise TesseraxError(f"{cache_dir!r} is not a pair cache (no {INFO_FILE}); write one with "
                        "`tesserax pairs --workdir TEACHER --out CACHE --num N`")
  with open(path) as f:
    return json.load(f)


def _claim(out_dir, info, write):
  """Refuse an out_dir holding pairs of anything else; write pairs.json where `write`."""
  path = os.path.join(out_dir, INFO_FILE)
  if os.path.exists(path):
    old = read_info(out_dir)
    differ = [k for k in info if old.get(k) != info[k]]
    if differ:
      raise TesseraxError(f"{out_dir} holds a pair cache of another {', '.join(differ)}; "
                          "generate into a new directory")
  elif write:
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


def pair_inputs(indices, shape, seed, num_classes):
  """(noise [n, *shape], labels [n]) of pairs `indices` (int32 [n])."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(indices)
  noise = jax.vmap(lambda k: jax.random.normal(k, tuple(shape)))(keys)
  return noise, (indices % num_classes).astype(jnp.int32)


def _write_shard(path, pair_features, batches):
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
  for noise, images, labels, indices in batches:
    for i in range(len(noise)):
      writer.write(pair_features.serialize_example(
          {"noise": noise[i], "image": images[i], "label": labels[i], "index": indices[i]}))
  writer.close()
  os.replace(path + ".tmp", path)  # its presence marks a complete shard


def generate(sample, out_dir, *, maker: dict, shape, num_classes: int, num_pairs: int,
             seed: int = 0, shard_size: int = 1000, batch_size: int = 64, mesh=None,
             log=print) -> str:
  """Writes `num_pairs` pairs (noise, sample(noise, labels)) to a cache at `out_dir` (see the
  module docstring), resuming an interrupted run; returns the absolute out_dir.

  Args:
    sample: `sample(noise, labels) -> x0`, any trained model with any solver; called on
      batches split along the batch over `mesh` (by default this process's devices).
    maker: JSON-able description of the model and solver, stored and compared on resume
      and by `check`.
    shape: the sample shape (H, W, C).
  """
  if num_pairs < 1 or shard_size < 1 or batch_size < 1 or num_classes < 1:
    raise TesseraxError(f"num_pairs {num_pairs}, shard_size {shard_size}, batch_size "
                        f"{batch_size} and num_classes {num_classes} must be positive")
  out_dir = os.path.abspath(out_dir)
  info = {"maker": maker, "shape": [int(s) for s in shape], "num_classes": int(num_classes),
          "seed": int(seed), "num_pairs": int(num_pairs), "shard_size": int(shard_size)}
  info = json.loads(json.dumps(info))  # as it reads back from pairs.json
  if jax.process_index() == 0:
    _claim(out_dir, info, write=True)
  _barrier("tesserax pairs claim")
  _claim(out_dir, info, write=False)

  mesh = mesh or sharding.local_mesh()
  make_inputs = jax.jit(lambda i: pair_inputs(i, shape, seed, num_classes))

  def run(indices):
    noise, labels = make_inputs(indices)
    return noise, sample(noise, labels), labels

  pair_features = features(shape, num_classes)
  num_shards = -(-num_pairs // shard_size)
  paths = shard_paths(out_dir, num_shards)
  todo = [s for s in range(jax.process_index(), num_shards, jax.process_count())
          if not os.path.exists(paths[s])]
  total = sum(min(shard_size, num_pairs - s * shard_size) for s in todo)
  update, finish = progress.reporter("pairs by this process:", "pairs", total, log)
  for s in todo:
    first, last = s * shard_size, min((s + 1) * shard_size, num_pairs)

    def batches(first=first, last=last):
      for start in range(first, last, batch_size):
        indices = np.arange(start, min(start + batch_size, last), dtype=np.int32)
        noise, images, labels = sharding.map_batched(run, (indices,), batch_size, mesh)
        yield noise, images, labels, indices.astype(np.int64)
        update(len(indices))

    _write_shard(paths[s], pair_features, batches())
    log(f"pairs: shard {s + 1}/{num_shards} written")

  _barrier("tesserax pairs shards")
  if jax.process_index() == 0:
    lengths = [min(shard_size, num_pairs - s * shard_size) for s in range(num_shards)]
    cache.write_metadata(out_dir, pair_features, {SPLIT: (lengths, paths)},
                         f"{num_pairs} (noise, sample) pairs")
  _barrier("tesserax pairs metadata")
  if total:
    finish()
  return out_dir


def _describe(maker, shape):
  made = ", ".join(f"{k} {v}" for k, v in sorted(maker.items())) + " at " if maker else ""
  return made + "x".join(str(s) for s in shape)


def check(cache_dir, maker: dict | None, shape) -> dict:
  """The cache's pairs.json, after refusing in one line a cache that is incomplete or was made
  by another model, solver or sample shape than `maker` and `shape` describe (`maker` None:
  any model)."""
  info = read_info(cache_dir)
  shape = [int(s) for s in shape]
  maker = None if maker is None else json.loads(json.dumps(maker))
  if maker is None and info["shape"] != shape:
    raise TesseraxError(f"pair cache {cache_dir} holds {_describe(None, info['shape'])} "
                        f"samples; this run needs {_describe(None, shape)}")
  if maker is not None and (info["maker"] != maker or info["shape"] != shape):
    raise TesseraxError(f"pair cache {cache_dir} was made by "
                        f"{_describe(info['maker'], info['shape'])}; this run needs "
                        f"{_describe(maker, shape)}")
  if not os.path.exists(os.path.join(cache_dir, "dataset_info.json")):
    raise TesseraxError(f"pair cache {cache_dir} is incomplete; re-run its generation with the "
                        "same arguments to complete it")
  return info


def open_pairs(cache_dir):
  """The read-only tfds builder of a complete pair cache."""
  if not cache_dir or not os.path.exists(os.path.join(cache_dir, "dataset_info.json")):
    raise TesseraxError(f"no complete pair cache in {cache_dir!r} (data.data_dir); write it "
                        "with `tesserax pairs --workdir TEACHER --out CACHE --num N`")
  return tfds.builder_from_directory(cache_dir)


def load(cache_dir) -> dict:
  """{"noise", "image": float32 [N, *shape], "label": int32 [N], "index": int64 [N]} of a
  complete pair cache, in pair order."""
  source = open_pairs(cache_dir).as_data_source(SPLIT)
  examples = [source[i] for i in range(len(source))]
  out = {k: np.stack([ex[k] for ex in examples]) for k in ("noise", "image", "label", "index")}
  order = np.argsort(out["index"])
  out = {k: v[order] for k, v in out.items()}
  out["label"] = out["label"].astype(np.int32)
  return out
