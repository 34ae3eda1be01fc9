"""DDPM ancestral and DDIM sampling with timestep respacing, as in DiT's diffusion/
(gaussian_diffusion.py and respace.py, from openai/improved-diffusion); registered as the
samplers `ddpm` and `ddim`, which consume the `epsilon` prediction.

The base process is DiT's: 1000 linear betas from 1e-4 to 0.02, tables in float64 and gathered
as float32 (`_extract_into_tensor`). Respacing keeps a subset of the steps and re-derives the
betas so that alpha_bar is unchanged there, beta'_i = 1 - alpha_bar[s_i] / alpha_bar[s_{i-1}]; the
network still sees the original step s_i (`_WrappedModel`). DiT samples FID images with 250
respaced steps, clip_denoised=False and cfg 1.5 on 3 channels (DiT sample.py, sample_ddp.py).

Network-free: a sampler sees `apply_fn(params, x, steps, labels) -> [eps | v]`, the output of a
learned-range-variance (LEARNED_RANGE) epsilon model at base-process steps `steps` ([B] float).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.sampling.guidance import guided_velocity
from tesserax.sampling.sample import Sampler

NUM_TIMESTEPS = 1000
METHODS = ("ddpm", "ddim")


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """get_named_beta_schedule('linear'): 1e-4 to 0.02 scaled by 1000 / num_timesteps, float64."""
  scale = 1000 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
  """respace.space_timesteps for integer counts: the kept steps, ascending.

  The steps are cut into len(section_counts) equal sections (the first ones one longer when
  that does not divide); section i keeps section_counts[i] steps at a fractional stride
  (size - 1) / (count - 1), accumulated and rounded. space_timesteps(1000, 250) is DiT's "250".
  """
  counts = [section_counts] if isinstance(section_counts, int) else list(section_counts)
  size_per, extra = divmod(num_timesteps, len(counts))
  start, kept = 0, set()
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if not 1 <= count <= size:
      raise TesseraxError(f"cannot keep {count} steps of a section of {size} diffusion steps")
    stride = 1 if count == 1 else (size - 1) / (count - 1)
    position = 0.0
    for _ in range(count):
      kept.add(start + round(position))
      position += stride
    start += size
  return sorted(kept)


def respaced_betas(betas: np.ndarray, steps) -> np.ndarray:
  """SpacedDiffusion's betas: the process restricted to `steps` with alpha_bar kept there."""
  alphas_cumprod = np.cumprod(1.0 - betas)[np.asarray(steps)]
  return 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])


def diffusion_tables(betas: np.ndarray) -> dict:
  """GaussianDiffusion's float64 tables for `betas`."""
  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.append(1.0, ab[:-1])
  posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
  # The variance is 0 at the first step; its log is clipped to the second step's (a one-step
  # process adds no noise, so its value there is never used).
  clipped = posterior_variance[1] if len(betas) > 1 else betas[0]
  return dict(
      log_betas=np.log(betas), alphas_cumprod=ab, alphas_cumprod_prev=ab_prev,
      sqrt_alphas_cumprod=np.sqrt(ab), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ab),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ab),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ab - 1.0),
      posterior_log_variance_clipped=np.log(np.append(clipped, posterior_variance[1:])),
      posterior_mean_coef1=betas * np.sqrt(ab_prev) / (1.0 - ab),
      posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab))


def gather(tables: dict, name: str, i, ndim: int):
  """tables[name][i] as float32, shaped to broadcast against an [B, ...] array of rank ndim
  (i: a scalar step index, or one per example)."""
  value = jnp.asarray(tables[name], jnp.float32)[i]
  return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def q_posterior(tables: dict, x0, x, i):
  """q(x_{i-1} | x_i, x0): (mean, clipped log variance)."""
  mean = (gather(tables, "posterior_mean_coef1", i, x.ndim) * x0
          + gather(tables, "posterior_mean_coef2", i, x.ndim) * x)
  return mean, gather(tables, "posterior_log_variance_clipped", i, x.ndim)


def predict_x0(tables: dict, x, i, eps):
  """x0 = sqrt(1 / ab) x - sqrt(1 / ab - 1) eps, not clipped (DiT's clip_denoised=False)."""
  return (gather(tables, "sqrt_recip_alphas_cumprod", i, x.ndim) * x
          - gather(tables, "sqrt_recipm1_alphas_cumprod", i, x.ndim) * eps)


def p_mean_variance(tables: dict, out, x, i):
  """p(x_{i-1} | x_i) of a LEARNED_RANGE model output [eps | v]: (mean, log variance, x0).

  log variance = f log(beta_i) + (1 - f) log(posterior variance_i) with f = (v + 1) / 2.
  """
  channels = x.shape[-1]
  if out.shape[-1] != 2 * channels:
    raise TesseraxError(f"a learned-range DDPM model outputs 2 x {channels} channels "
                        f"[eps | v], got {out.shape[-1]}; set model.learn_sigma=True")
  eps, v = out[..., :channels], out[..., channels:]
  frac = (v + 1) / 2
  log_var = (frac * gather(tables, "log_betas", i, x.ndim)
             + (1 - frac) * gather(tables, "posterior_log_variance_clipped", i, x.ndim))
  x0 = predict_x0(tables, x, i, eps)
  mean, _ = q_posterior(tables, x0, x, i)
  return mean, log_var, x0


def make_ddpm_sampler(apply_fn, *, method: str = "ddpm", num_steps: int = 250,
                      cfg_scale: float = 1.0, guided_channels=None, null_label: int):
  """Returns a jitted `sample(params, noise, labels, key) -> x0`, noise being x at the last step.

  Args:
    apply_fn: `apply_fn(params, x, steps, labels) -> [eps | v]` at base-process steps [B].
    method: 'ddpm' (ancestral p_sample_loop: x = mean + exp(log_var / 2) z, no noise at the last
      step) or 'ddim' (ddim_sample_loop with eta 0: x = x0 sqrt(ab_prev) + sqrt(1 - ab_prev) eps;
      it uses eps only).
    num_steps: respaced steps, space_timesteps(1000, num_steps); DiT uses 250.
    cfg_scale, guided_channels: classifier-free guidance at every step (DiT has no interval) on
      the epsilon channels, all of them for None or the first k (3 is the official quirk,
      sampling/guidance.py); the variance channels stay conditional, as in forward_with_cfg.
    null_label: the unconditional label.
  `key` draws the ancestral noise; DDIM ignores it. Inputs may arrive sharded along the batch.
  """
  if method not in METHODS:
    raise TesseraxError(f"unknown DDPM sampler {method!r}; choose from {', '.join(METHODS)}")
  steps = space_timesteps(NUM_TIMESTEPS, num_steps)
  tables = diffusion_tables(respaced_betas(linear_betas(), steps))
  step_map = np.asarray(steps, np.float32)
  last = len(steps) - 1

  def sample(params, noise, labels, key):
    channels = noise.shape[-1]
    model_fn = lambda x, s, y: apply_fn(params, x, s, y)
    output_fn = guided_velocity(model_fn, labels, null_label, cfg_scale, (-math.inf, math.inf),
                                channels if guided_channels is None else guided_channels)

    def step(j, x):
      i = last - j
      out = output_fn(x, jnp.asarray(step_map)[i])
      if method == "ddim":
        eps = out[..., :channels]
        x0 = predict_x0(tables, x, i, eps)
        ab_prev = gather(tables, "alphas_cumprod_prev", i, x.ndim)
        return x0 * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev) * eps
      mean, log_var, _ = p_mean_variance(tables, out, x, i)
      z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      return mean + jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0) * z

    return jax.lax.fori_loop(0, len(steps), step, noise)

  return jax.jit(sample)


def _make(method, predict, settings, *, null_label, mesh):
  del mesh  # the jitted sampler follows the sharding of its inputs
  return make_ddpm_sampler(predict, method=method, num_steps=settings.num_steps,
                           cfg_scale=settings.cfg_scale,
                           guided_channels=settings.guided_channels, null_label=null_label)


for _method in METHODS:
  registry.SAMPLERS.register(_method, Sampler("epsilon", functools.partial(_make, _method)))
