"""A compiled class-conditional sampler: time grid + guidance + solver over an `apply_fn`."""
import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tesserax.errors import TesseraxError
from tesserax.sampling.guidance import guided_velocity
from tesserax.sampling.solvers import SOLVERS, heun
from tesserax.sampling.timesteps import time_grid
from tesserax.training.sharding import BATCH_AXES


def make_sampler(apply_fn, *, solver="euler", num_steps, shift=1.0, cfg_scale=1.0,
                 interval=(0.0, 1.0), null_label, final_correction=True, mesh=None,
                 guided_channels=None):
  """Returns a jitted `sample(params, noise, labels) -> x0`.

  Args:
    apply_fn: `apply_fn(params, x, t_vec, labels) -> v` with t_vec [B] in flow time
      (t = 1 noise) and v = eps - x0.
    solver: 'euler' or 'heun' (sampling/solvers.py).
    num_steps: solver steps N over `time_grid(num_steps, shift)`.
    shift: SD3 timestep shift (sampling/timesteps.py).
    cfg_scale, interval, null_label: classifier-free guidance (sampling/guidance.py).
    final_correction: Heun only; False makes the last step Euler (EDM, NFE = 2N - 1).
    guided_channels: None guides every channel; k only the first k (the official DiT and
      LightningDiT quirk, sampling/guidance.py), for reproducing published numbers.
    mesh: optional Mesh with axes ('data', 'fsdp', 'tensor'). noise, labels and the output are
      split along the batch over ('data', 'fsdp'); params keep the sharding they arrive with.
      In a multi-process run noise and labels must be global arrays.

  The sampler compiles once per input shape; build it once and reuse it.
  """
  if solver not in SOLVERS:
    raise TesseraxError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
  solve = SOLVERS[solver]
  if solver == "heun":
    solve = functools.partial(heun, final_correction=final_correction)
  times = np.asarray(time_grid(num_steps, shift))  # a host constant of the compiled sampler

  def sample(params, noise, labels):
    if labels.shape != noise.shape[:1]:
      raise TesseraxError(
          f"labels must have shape [{noise.shape[0]}] to match noise {noise.shape}, "
          f"got {labels.shape}")
    model_fn = lambda x, t_vec, y: apply_fn(params, x, t_vec, y)
    velocity_fn = guided_velocity(model_fn, labels, null_label, cfg_scale, interval,
                                  guided_channels)
    return solve(velocity_fn, noise, times)

  if mesh is None:
    return jax.jit(sample)

  shards = mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]]
  batch = NamedSharding(mesh, P(BATCH_AXES))  # trailing dimensions replicated
  jitted = jax.jit(sample, in_shardings=(None, batch, batch), out_shardings=batch)

  def sharded_sample(params, noise, labels):
    if noise.shape[0] % shards:
      raise TesseraxError(
          f"batch {noise.shape[0]} is not divisible by the {shards} data x fsdp devices")
    return jitted(params, noise, labels)

  return sharded_sample
