"""Worker for test_trainer: one training step on 8 fake CPU devices under several meshes.

Prints JSON: for each mesh, the max |difference| to the 1-device run of the loss and of every
array of the new state, how many parameters the mesh actually sharded, and the bytes per device
that the compiled step's all-gathers return.
"""
import json
import os
import re
import sys

from tesserax.core import host  # XLA_FLAGS is read later, by the first backend

os.environ.update(host.xla_flags_env(os.environ, "--xla_force_host_platform_device_count=8"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np

import tesserax.tasks  # noqa: F401  (registers the diffusion task)
from tesserax.core import config as config_lib, sharding
from tesserax.training import task as task_lib

MESHES = {"data_parallel": (1, 1), "fsdp": (-1, 1), "fsdp_x_tensor": (4, 2)}


def all_gather_bytes(hlo_text):
  """Bytes of the results of the all-gathers in a compiled (partitioned) HLO module."""
  return sum(4 * int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"= f32\[([\d,]*)\][^ ]* all-gather\(", hlo_text))


def one_step(config, batch, fsdp, tensor, devices):
  config.mesh.fsdp, config.mesh.tensor = fsdp, tensor
  mesh = sharding.make_mesh(config.mesh, devices)
  task = task_lib.build(config, mesh)
  state, batch = task.init(), sharding.global_batch(batch, mesh)
  hlo = jax.jit(task._train_step).lower(state, batch, None, None).compile().as_text()
  state, metrics = task.train_step(state, batch)
  sharded = sum(any(axis is not None for axis in x.sharding.spec)
                for x in jax.tree.leaves(state["params"]))
  host = jax.tree.map(np.asarray, jax.device_get(state))
  return float(metrics["loss"]), host, sharded, all_gather_bytes(hlo)


def main(data_dir):
  assert jax.device_count() == 8
  config = config_lib.load("digits_dit:tiny")
  config.data.data_dir = data_dir
  config.model.hidden_size, config.model.num_heads = 64, 4
  config.ema_decay = 0.5  # so the EMA visibly moves in one step
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (16, 16, 16, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  ref_loss, ref_state, _, _ = one_step(config, batch, 1, 1, jax.devices()[:1])
  results = {}
  for name, (fsdp, tensor) in MESHES.items():
    loss, state, sharded, gathered = one_step(config, batch, fsdp, tensor, jax.devices())
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a.astype(np.float64) - b))) if a.size
                         else 0.0, state, ref_state)
    results[name] = {"loss": abs(loss - ref_loss), "state": max(jax.tree.leaves(diffs)),
                     "sharded_params": sharded, "ref_loss": ref_loss, "all_gather": gathered}
  print("RESULT " + json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1])
