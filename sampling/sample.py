"""Samplers by name: what each consumes, and the compiled flow sampler (time grid + guidance +
solver over an `apply_fn`).

A sampler is registered in core/registry.py SAMPLERS under its `config.sample.solver` name as
a `Sampler`: the prediction kind it consumes (objectives/context.py) and
`make(predict, settings, *, null_label, mesh) -> sample(params, noise, labels, key)`, with
`predict(params, x, time, labels)` a prediction of that kind and `settings` the sample config
(num_steps, shift, cfg_scale, interval, guided_channels, final_correction). `build` picks the
model's prediction the sampler consumes and refuses a mismatch in one line.
"""
import functools
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.sampling.guidance import guided_velocity
from tesserax.sampling.solvers import SOLVERS, heun
from tesserax.sampling.timesteps import time_grid
from tesserax.core.sharding import BATCH_AXES


class Sampler(NamedTuple):
  consumes: str
  make: Callable


def build(settings, predictions, *, null_label, mesh=None):
  """`sample(params, noise, labels, key) -> x0` of the sampler `settings.solver` over the
  model's `predictions` ({kind: predict(params, x, time, labels)}, its own kind first)."""
  sampler = registry.SAMPLERS.get(settings.solver)
  if sampler.consumes not in predictions:
    raise TesseraxError(f"{settings.solver} needs {sampler.consumes}; this model gives "
                        f"{' or '.join(predictions)}")
  return sampler.make(predictions[sampler.consumes], settings, null_label=null_label,
                      mesh=mesh)


def make_sampler(apply_fn, *, solver="euler", num_steps, shift=1.0, cfg_scale=1.0,
                 interval=(0.0, 1.0), null_label, final_correction=True, mesh=None,
                 guided_channels=None):
  """Returns a jitted `sample(params, noise, labels) -> x0`.

  Args:
    apply_fn: `apply_fn(params, x, t_vec, labels) -> v` with t_vec [B] in flow time
      (t = 1 noise) and v = eps - x0.
    solver: 'euler' or 'heun' (sampling/solvers.py), or a solve(velocity_fn, noise, times)
      function (sampling/multistep.py).
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
  if callable(solver):
    solve = solver
  elif solver not in SOLVERS:
    raise TesseraxError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
  else:
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


def make_flow(solver, predict, settings, *, null_label, mesh):
  """A Sampler's make for a flow solver (a name of sampling/solvers.py or a solve function)
  over a velocity prediction."""
  sample = make_sampler(
      predict, solver=solver, num_steps=settings.num_steps, shift=settings.shift,
      cfg_scale=settings.cfg_scale, interval=tuple(settings.interval), null_label=null_label,
      final_correction=settings.get("final_correction", True), mesh=mesh,
      guided_channels=settings.guided_channels)
  return lambda params, noise, labels, key: sample(params, noise, labels)


for _name in SOLVERS:
  registry.SAMPLERS.register(_name, Sampler("velocity", functools.partial(make_flow, _name)))
