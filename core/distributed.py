"""Multi-host start-up: `jax.distributed.initialize` from explicit flags or the environment.

On Cloud TPU pods and under SLURM JAX finds the coordinator itself; elsewhere every process is
given the coordinator address, the number of processes and its own id. After this, jax.devices()
lists every process's devices, the mesh spans them all, each process loads only its slice of the
data (data/pipeline.py) and process 0 alone writes logs, metrics and samples.
"""
import os

import jax

from tesserax.core.errors import TesseraxError

_AUTO_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise TesseraxError("multi-host needs all of --coordinator_address, --num_processes and "
                          "--process_id")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif any(os.environ.get(name) for name in _AUTO_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
    jax.distributed.initialize()
