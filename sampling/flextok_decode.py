"""The rectified-flow decoder's sampler (FlexTok's MinRFPipeline, apple/ml-flextok
flextok/flow_matching/pipelines.py) with classifier-free guidance or APG.

Euler from t = 1 (noise) to t = 0 in `num_steps` uniform steps, x <- x - (1 / N) v(x, t) at
t = i / N for i = N, ..., 1: FlexTok's flow time is tesserax's (x_t = (1 - t) x0 + t eps,
v = eps - x0), so no conversion. With guidance each step evaluates the conditional and the
null-conditioned velocity and combines them:

  cfg:  v = v_u + w (v_c - v_u)                                       (Ho & Salimans 2022)
  apg:  adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416, Alg. 1; the
        official flow_matching/cfg_utils.py normalized_guidance):
          d = v_c - v_u;  m <- d + beta m  (momentum beta, m = 0 before the first step)
          d = m * min(1, r / ||m||)        (norm threshold r, per example over C, H, W)
          d_par = <d, u> u with u = v_c / ||v_c||,  d_orth = d - d_par
          v = v_c + (w - 1) (d_orth + eta d_par)
        FlexTok decodes with w = 7.5, beta = -0.5, r = 2.5, eta = 0.
"""
import jax
import jax.numpy as jnp

from tesserax.core.errors import TesseraxError

GUIDANCE = ("cfg", "apg")
APG_MOMENTUM, APG_NORM_THRESHOLD, APG_ETA = -0.5, 2.5, 0.0


def _per_example(x):
  return tuple(range(1, x.ndim))


def cfg(v_cond, v_uncond, scale):
  """v_u + w (v_c - v_u)."""
  return v_uncond + scale * (v_cond - v_uncond)


def apg(v_cond, v_uncond, scale, running, *, momentum=APG_MOMENTUM,
        norm_threshold=APG_NORM_THRESHOLD, eta=APG_ETA):
  """(guided velocity, new momentum buffer) of adaptive projected guidance (module doc);
  `running` the buffer of the previous step (zeros at the first)."""
  axes = _per_example(v_cond)
  running = (v_cond - v_uncond) + momentum * running
  diff = running
  if norm_threshold > 0:
    norm = jnp.sqrt(jnp.sum(jnp.square(diff), axes, keepdims=True))
    diff = diff * jnp.minimum(1.0, norm_threshold / norm)
  unit = v_cond / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(v_cond), axes, keepdims=True)), 1e-12)
  parallel = jnp.sum(diff * unit, axes, keepdims=True) * unit
  return v_cond + (scale - 1) * (diff - parallel + eta * parallel), running


def decode(velocity_fn, noise, num_steps, guidance_scale=1.0, guidance="apg"):
  """x0 from `noise` [B, ...] by Euler over N = num_steps uniform steps.

  velocity_fn(x, t, null) -> v: t float [B], null bool [B] (True: the null condition, the
  unconditional pass). guidance_scale 1 makes one conditional evaluation per step; otherwise
  one call on the doubled batch [x_0, x_0, x_1, x_1, ...] (each example next to its copy)."""
  if not (isinstance(num_steps, int) and num_steps >= 1):
    raise TesseraxError(f"decoder steps must be a positive integer, got {num_steps!r}")
  if guidance not in GUIDANCE:
    raise TesseraxError(f"unknown guidance {guidance!r}; choose from {', '.join(GUIDANCE)}")
  b = noise.shape[0]
  dt = 1.0 / num_steps

  def velocity(x, t, running):
    if guidance_scale == 1.0:
      return velocity_fn(x, t, jnp.zeros((b,), bool)), running
    null = jnp.tile(jnp.array([False, True]), b)
    v = velocity_fn(jnp.repeat(x, 2, axis=0), jnp.repeat(t, 2), null)
    v = v.reshape((b, 2) + v.shape[1:])
    if guidance == "cfg":
      return cfg(v[:, 0], v[:, 1], guidance_scale), running
    return apg(v[:, 0], v[:, 1], guidance_scale, running)

  def step(i, carry):
    x, running = carry
    t = jnp.full((b,), (num_steps - i) * dt, x.dtype)
    v, running = velocity(x, t, running)
    return x - dt * v, running

  x, _ = jax.lax.fori_loop(0, num_steps, step, (noise, jnp.zeros_like(noise)))
  return x
