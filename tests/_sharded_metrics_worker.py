"""Inception statistics on 8 fake CPU devices, batch-sharded over a mesh.

Run by tests/test_metrics.py as `python _sharded_metrics_worker.py CACHE_DIR OUT.npz` with
XLA_FLAGS=--xla_force_host_platform_device_count=8. Loads the test's random-weight Inception
from CACHE_DIR, runs `worker_images()` through eval.metrics.accumulate with batches of 8
(1 per device) and, for comparison, one image at a time without a mesh, and writes both runs'
pool and spatial means and covariances to OUT.npz.
"""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402


def worker_images():
  """10 uint8 32x32 RGB images: 8 fill one sharded batch, the last 2 a padded one."""
  return np.random.RandomState(7).randint(0, 256, (10, 32, 32, 3)).astype(np.uint8)


def main(cache_dir, out):
  from tesserax.backbones import weights
  from tesserax.eval import metrics

  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  model = weights.load("inception", cache_dir)
  stats = {}
  for prefix, kwargs in (("", dict(batch_size=8, mesh=mesh)), ("one_device_", dict(batch_size=1))):
    acc = metrics.accumulate(worker_images(), inception=model, **kwargs)
    for key in ("pool", "spatial"):
      stats.update({f"{prefix}{key}_mean": acc[key].mean, f"{prefix}{key}_cov": acc[key].cov})
  np.savez(out, **stats)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
