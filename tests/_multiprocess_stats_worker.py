"""One of two CPU processes (2 devices each) combining FeatureStats with `all_processes`.

Run by tests/test_eval.py as `python _multiprocess_stats_worker.py PORT PROCESS_ID OUT.npz`.
Rows of `worker_data()` reach the statistics three ways: as global arrays batch-sharded over
the 4 devices of both processes, as a global array replicated on every device (which must
still count once), and as process-local NumPy batches of unequal size. Process 0 writes the
combined count, mean and covariance to OUT.npz.
"""
import os
import sys

from tesserax.core import host  # XLA_FLAGS is read later, by the first backend

os.environ.update(host.xla_flags_env(os.environ, "--xla_force_host_platform_device_count=2"))
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def worker_data():
  """100 float32 feature rows of dimension 6, far from zero mean, on different scales."""
  rng = np.random.RandomState(0)
  return (rng.randn(100, 6) * [1.0, 10.0, 0.1, 3.0, 1.0, 50.0] + 100.0).astype(np.float32)


def main(port, process_id, out):
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  from tesserax.eval.stats import FeatureStats, all_processes

  assert jax.process_count() == 2 and jax.device_count() == 4
  data = worker_data()
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  stats = FeatureStats()
  for start, stop in ((0, 40), (40, 72)):  # batch-sharded global arrays: 20 / 16 rows here
    half = (stop - start) // 2
    local = data[start + process_id * half:start + (process_id + 1) * half]
    stats.update(jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("batch")), local, (stop - start, 6)))
  replicated = jax.make_array_from_process_local_data(NamedSharding(mesh, P()), data[72:80])
  stats.update(replicated)
  stats.update(data[80:83] if process_id == 0 else data[83:100])  # process-local NumPy
  total = all_processes(stats)
  if process_id == 0:
    np.savez(out, count=total.count, mean=total.mean, cov=total.cov)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
