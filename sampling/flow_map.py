"""Flow-map sampling: chained jumps x_{k+1} = X(x_k, t_k, t_{k+1}) of a model that predicts the
flow map X(x, t, s), the state at time s of the flow through x at time t (MeanFlow, shortcut
models, CTM). One step from pure noise is X(eps, 1, 0); k steps follow tesserax's time grid
(uniform, with the SD3 shift). Registered as the sampler `flow_map`, which consumes the
`flow_map` prediction (predict(params, x, t, s, labels), t and s of shape [B]).

Classifier-free guidance, when asked for (flow-map objectives usually fold it into training,
then cfg_scale is 1), combines the conditional and unconditional jumps, X_u + w (X_c - X_u),
for t in the guidance interval, as sampling/guidance.py does for velocities.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tesserax.core import registry
from tesserax.sampling.guidance import guided_velocity
from tesserax.sampling.sample import Sampler
from tesserax.sampling.timesteps import time_grid


def make_flow_map_sampler(predict, *, num_steps, shift=1.0, cfg_scale=1.0, interval=(0.0, 1.0),
                          guided_channels=None, null_label):
  """A jitted `sample(params, noise, labels) -> x0` of `num_steps` jumps."""
  times = np.asarray(time_grid(num_steps, shift))

  def sample(params, noise, labels):
    grid = jnp.asarray(times)

    def step(i, x):
      s = grid[i + 1]
      jump = lambda x, t_vec, y: predict(params, x, t_vec, jnp.full_like(t_vec, s), y)
      return guided_velocity(jump, labels, null_label, cfg_scale, interval,
                             guided_channels)(x, grid[i])

    return jax.lax.fori_loop(0, num_steps, step, noise)

  return jax.jit(sample)


def _make(predict, settings, *, null_label, mesh):
  del mesh  # the jitted sampler follows the sharding of its inputs
  sample = make_flow_map_sampler(
      predict, num_steps=settings.num_steps, shift=settings.shift,
      cfg_scale=settings.cfg_scale, interval=tuple(settings.interval),
      guided_channels=settings.guided_channels, null_label=null_label)
  return lambda params, noise, labels, key: sample(params, noise, labels)


registry.SAMPLERS.register("flow_map", Sampler("flow_map", _make))
