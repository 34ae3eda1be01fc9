"""2-rectified flow++'s "new" sampler (Lee, Lin, Fanti 2024; sangyun884/rfpp generate.py
`--sampler new`): instead of an Euler step, each step re-anchors on the initial noise z1,

  x0_hat = z_t - t v(z_t, t),   z_{t'} = (1 - t') x0_hat + t' z1,

which is exact for a straight coupling (2-RF pairs are near-deterministic) and ends at
x0_hat of the last step. `reflow_new` uses one evaluation per step; `reflow_new_heun` averages
v(z_t, t) with v at the re-anchored next point, except on the last step (as rfpp's Heun does),
so it costs 2N - 1 evaluations. Both consume a velocity and take the usual time grid and
guidance (sampling/sample.py).
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.sampling import sample


def reanchored(velocity_fn, noise, times, heun=False):
  """`solve(velocity_fn, noise, times)` of the re-anchoring sampler (module docstring)."""
  times = jnp.asarray(times, jnp.float32)
  last = times.shape[0] - 2

  def step(i, z):
    t, t_next = times[i], times[i + 1]
    v = velocity_fn(z, t)
    if heun:
      corrected = lambda v: (v + velocity_fn((1 - t_next) * (z - t * v) + t_next * noise,
                                             t_next)) / 2
      v = jax.lax.cond(i < last, corrected, lambda v: v, v)
    return (1 - t_next) * (z - t * v) + t_next * noise

  return jax.lax.fori_loop(0, times.shape[0] - 1, step, noise)


for _name, _heun in (("reflow_new", False), ("reflow_new_heun", True)):
  registry.SAMPLERS.register(_name, sample.Sampler(
      "velocity", functools.partial(sample.make_flow, functools.partial(reanchored, heun=_heun))))
