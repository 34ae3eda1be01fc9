"""Few-step samplers of consistency models, over the `denoiser` prediction f(x_sigma, sigma)
(EDM sigma, x_sigma = x0 + sigma eps) or the `flow_map` prediction X(x_t, t, s) (flow time).

- `consistency`: multistep consistency sampling (Song et al. 2023, Alg. 1): x = f(sigma_0 z,
  sigma_0), then for each later level re-noise x + sqrt(sigma_i^2 - sigma_min^2) z_i and apply
  f again. The levels are `sample.sigmas` (descending, the first `num_steps` used): (80,) is one
  step, (80, 0.821) ECT's CIFAR-10 two steps (1.526 on ImageNet-64).
- `scm`: sCM's sampling in TrigFlow angles (Lu & Song 2025, Alg. 1): the first level
  `sample.sigma_max`, then tau in `sample.mid_angles` (default 1.1, xandergos/sCM-mnist) at
  sigma = sigma_d tan(tau), re-noised as cos(tau) x0 + sin(tau) z (sigma_min = 0).
- `ctm`: CTM's gamma-sampling (Kim et al. 2024, Alg. 2): from level sigma_n jump to
  sqrt(1 - gamma^2) sigma_{n+1} with the flow map, then add gamma sigma_{n+1} fresh noise;
  levels `sample.sigmas` then 0; gamma = 0 is deterministic, gamma = 1 multistep consistency
  sampling.

Classifier-free guidance is folded into these models' training, so cfg_scale must be 1.
"""
import math

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.sampling.sample import Sampler


def consistency_sample(predict, params, noise, labels, key, sigmas, sigma_min):
  """Alg. 1 of Song et al. 2023 over `predict(params, x, sigma [B], labels)`; sigmas host
  floats, descending."""
  full = lambda sigma: jnp.full(noise.shape[:1], sigma, noise.dtype)
  x = predict(params, sigmas[0] * noise, full(sigmas[0]), labels)
  for i, sigma in enumerate(sigmas[1:]):
    z = jax.random.normal(jax.random.fold_in(key, i), noise.shape, noise.dtype)
    x = predict(params, x + math.sqrt(sigma ** 2 - sigma_min ** 2) * z, full(sigma), labels)
  return x


def gamma_sample(predict, params, noise, labels, key, sigmas, gamma):
  """CTM's gamma-sampling over the flow map `predict(params, x_t, t, s, labels)`, from
  sigmas[0] through the descending host `sigmas` to 0."""
  full = lambda sigma: jnp.full(noise.shape[:1], sigma / (1 + sigma), noise.dtype)
  x = sigmas[0] * noise / (1 + sigmas[0])  # the flow state at sigma_0
  levels = list(sigmas) + [0.0]
  for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
    jump_to = math.sqrt(1 - gamma ** 2) * sigma_next
    x = predict(params, x, full(sigma), full(jump_to), labels) * (1 + jump_to)
    if gamma > 0 and sigma_next > 0:
      z = jax.random.normal(jax.random.fold_in(key, i), noise.shape, noise.dtype)
      x = x + gamma * sigma_next * z
    x = x / (1 + sigma_next)
  return x


def _levels(settings, solver):
  sigmas = settings.get("sigmas")
  if not sigmas:
    raise TesseraxError(f"sampler {solver} needs sample.sigmas, the descending noise levels "
                        "(e.g. (80.0, 0.821))")
  if settings.num_steps > len(sigmas):
    raise TesseraxError(f"sampler {solver}: {settings.num_steps} steps need that many "
                        f"sample.sigmas; got {tuple(sigmas)}")
  return [float(s) for s in sigmas[:settings.num_steps]]


def _unguided(settings, solver):
  if settings.cfg_scale != 1.0:
    raise TesseraxError(f"sampler {solver} does not guide (cfg_scale must be 1); consistency "
                        "models fold guidance into training")


def _make_consistency(predict, settings, *, null_label, mesh):
  del null_label, mesh  # the jitted sampler follows the sharding of its inputs
  _unguided(settings, "consistency")
  sigmas, sigma_min = _levels(settings, "consistency"), settings.get("sigma_min", 0.002)
  return jax.jit(lambda params, noise, labels, key: consistency_sample(
      predict, params, noise, labels, key, sigmas, sigma_min))


def _make_scm(predict, settings, *, null_label, mesh):
  del null_label, mesh
  _unguided(settings, "scm")
  sigma_data = settings.get("sigma_data", 0.5)
  angles = tuple(settings.get("mid_angles", (1.1,)))
  if settings.num_steps > 1 + len(angles):
    raise TesseraxError(f"sampler scm: {settings.num_steps} steps need "
                        f"{settings.num_steps - 1} sample.mid_angles; got {angles}")
  sigmas = [float(settings.get("sigma_max", 80.0))] + [
      sigma_data * math.tan(a) for a in angles[:settings.num_steps - 1]]
  return jax.jit(lambda params, noise, labels, key: consistency_sample(
      predict, params, noise, labels, key, sigmas, 0.0))


def _make_ctm(predict, settings, *, null_label, mesh):
  del null_label, mesh
  _unguided(settings, "ctm")
  sigmas, gamma = _levels(settings, "ctm"), float(settings.get("gamma", 0.0))
  if not 0 <= gamma <= 1:
    raise TesseraxError(f"sampler ctm: sample.gamma={gamma}; must be in [0, 1]")
  return jax.jit(lambda params, noise, labels, key: gamma_sample(
      predict, params, noise, labels, key, sigmas, gamma))


registry.SAMPLERS.register("consistency", Sampler("denoiser", _make_consistency))
registry.SAMPLERS.register("scm", Sampler("denoiser", _make_scm))
registry.SAMPLERS.register("ctm", Sampler("flow_map", _make_ctm))
