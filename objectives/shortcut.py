"""Shortcut models (Frans, Hafner, Levine, Abbeel, ICLR 2025, "One Step Diffusion via Shortcut
Models"; the official JAX code kvfrans/shortcut-models, targets_shortcut.py).

The network s(x_t, t, d) is conditioned on the step size d and predicts the average velocity
of one jump of size d in tesserax's convention (x_t = (1 - t) x0 + t eps, t = 1 noise): the
jump is x_{t-d} = x_t - d s(x_t, t, d). d goes in through the second time input
(`net(x, t, labels, s=d)`, `model.second_time`) as the real number it is; the official code
feeds the integer level log2(1/d) to its timestep embedder.

Each batch (official defaults: denoise_timesteps 128, bootstrap_every 8):
- the first B // bootstrap_every examples get self-consistency targets (paper eq. 5) from the
  EMA network (`bootstrap_ema=1`): with L = log2(denoise_timesteps) levels, the step sizes
  d = 1/2^l for l = L-1, ..., 0 fill equal consecutive blocks (the remainder gets d = 1); t lies
  on the grid {d, 2d, ..., 1}; the target is the mean of two half steps,
      s1 = s(x_t, t, d/2),  x' = clip(x_t - d/2 s1, -4, 4),  s2 = s(x', t - d/2, d/2),
      target = clip((s1 + s2) / 2, -4, 4);
  their labels are never dropped. With `bootstrap_cfg`, the first block (the smallest d) uses
  guided half steps s_u + w (s_c - s_u) (the README's ImageNet runs: w = cfg_scale 1.5);
- the rest get flow matching, target eps - x0, at t in {1, 2, ..., T}/T and the smallest
  step d = 1/T (the official conditioning of its flow-matching examples), labels dropped with
  probability class_dropout.
The loss is the mean squared error over the whole batch.

Predictions: `flow_map` X(x, t, s) = x - (t - s) s(x, t, t - s), which sampling/flow_map.py
chains (k uniform steps of d = 1/k: the official sampler); and `velocity` s(x, t, 1/T), the
flow-matching field, so the flow solvers also apply.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Objective

CLIP = 4.0  # the official clip of the intermediate point and of the bootstrap target


def _expand(a, x):
  return a.reshape((-1,) + (1,) * (x.ndim - 1))


def shortcut(apply, params, x, t, d, labels):
  """s(x, t, d): the average velocity of the jump of size d from time t."""
  return apply(params, x, t, labels, s=d)[..., :x.shape[-1]]


def bootstrap_step_sizes(bootstrap_size, denoise_timesteps):
  """Host float32 [bootstrap_size]: d = 1/2^l in equal blocks for l = L-1 down to 0, then 1."""
  levels = int(np.log2(denoise_timesteps)) if denoise_timesteps >= 2 else 0
  if levels == 0 or 2 ** levels != denoise_timesteps:
    raise TesseraxError(f"denoise_timesteps must be a power of two >= 2, got {denoise_timesteps}")
  exponents = np.repeat(np.arange(levels - 1, -1, -1), bootstrap_size // levels)
  exponents = np.concatenate([exponents, np.zeros(bootstrap_size - len(exponents), int)])
  return (0.5 ** exponents).astype(np.float32)


def self_consistency_target(s_fn, x, t, d):
  """clip of the mean of two half steps of `s_fn(x, t, d)` (paper eq. 5; the official clips)."""
  half = d / 2
  s1 = s_fn(x, t, half)
  x_mid = jnp.clip(x - _expand(half, x) * s1, -CLIP, CLIP)
  s2 = s_fn(x_mid, t - half, half)
  return jnp.clip((s1 + s2) / 2, -CLIP, CLIP)


def guided_rows(s_fn, labels, null_label, scale, num_guided):
  """s_fn with classifier-free guidance s_u + w (s_c - s_u) on the first `num_guided` rows."""
  if num_guided == 0 or scale == 1.0:
    return lambda x, t, d: s_fn(x, t, d, labels)

  def guided(x, t, d):
    rows = lambda a: jnp.concatenate([a, a[:num_guided]])
    null = jnp.full((num_guided,), null_label, labels.dtype)
    out = s_fn(rows(x), rows(t), rows(d), jnp.concatenate([labels, null]))
    cond, uncond = out[:x.shape[0]], out[x.shape[0]:]
    cfg = uncond + scale * (cond[:num_guided] - uncond)
    return jnp.concatenate([cfg, cond[num_guided:]])

  return guided


def loss(apply, params, batch, ctx, *, settings, class_dropout):
  x0, labels = batch["image"], batch["label"]
  b = x0.shape[0]
  steps = settings.denoise_timesteps
  n_boot = b // settings.bootstrap_every
  key_t, key_boot_t, key_eps, key_drop = jax.random.split(ctx.key, 4)
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)

  d_boot = jnp.asarray(bootstrap_step_sizes(n_boot, steps))
  sections = jnp.round(1 / d_boot).astype(jnp.int32)
  t_boot = (jax.random.randint(key_boot_t, (n_boot,), 0, sections) + 1) / sections
  t_flow = (jax.random.randint(key_t, (b - n_boot,), 0, steps) + 1) / steps
  t = jnp.concatenate([t_boot, t_flow]).astype(x0.dtype)
  d = jnp.concatenate([d_boot, jnp.full((b - n_boot,), 1 / steps)]).astype(x0.dtype)
  x_t = (1 - _expand(t, x0)) * x0 + _expand(t, x0) * eps

  teacher = ctx.ema if settings.bootstrap_ema else params
  s_fn = lambda x, t, d, y: shortcut(apply, teacher, x, t, d, y)
  num_guided = (n_boot // int(np.log2(steps))) if settings.bootstrap_cfg else 0
  s_boot = guided_rows(s_fn, labels[:n_boot], ctx.num_classes, settings.cfg_scale, num_guided)
  boot_target = self_consistency_target(s_boot, x_t[:n_boot], t[:n_boot], d[:n_boot])
  target = jnp.concatenate([jax.lax.stop_gradient(boot_target), (eps - x0)[n_boot:]])

  drop = jax.random.uniform(key_drop, (b,)) < class_dropout
  drop = drop & (jnp.arange(b) >= n_boot)
  labels = jnp.where(drop, ctx.num_classes, labels)
  error = jnp.mean(jnp.square(shortcut(apply, params, x_t, t, d, labels) - target),
                   axis=tuple(range(1, x0.ndim)))
  total = jnp.mean(error)
  return total, {"loss": total, "loss_flow": jnp.mean(error[n_boot:]),
                 "loss_bootstrap": jnp.mean(error[:n_boot]) if n_boot else jnp.zeros(())}


def flow_map(apply, params, x, t, s, labels):
  """X(x, t, s) = x - (t - s) s(x, t, t - s): one shortcut jump from t to s."""
  return x - _expand(t - s, x) * shortcut(apply, params, x, t, t - s, labels)


def velocity(apply, params, x, t, labels, *, smallest):
  """The flow-matching field s(x, t, 1/denoise_timesteps)."""
  return shortcut(apply, params, x, t, jnp.full_like(t, smallest), labels)


@registry.OBJECTIVES.register("shortcut")
def make(config) -> Objective:
  """config.objective: denoise_timesteps, bootstrap_every, bootstrap_ema, bootstrap_cfg,
  cfg_scale; labels of flow-matching examples dropped with config.model.class_dropout."""
  if not config.model.get("second_time", False):
    raise TesseraxError("objective shortcut needs a network with a second time input for the "
                        "step size (model.second_time=True)")
  settings = config.objective
  bootstrap_step_sizes(0, settings.denoise_timesteps)  # refuses a non-dyadic grid
  return Objective(
      loss=functools.partial(loss, settings=settings, class_dropout=config.model.class_dropout),
      predictions={"flow_map": flow_map,
                   "velocity": functools.partial(velocity,
                                                 smallest=1.0 / settings.denoise_timesteps)})
