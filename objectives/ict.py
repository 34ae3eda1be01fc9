"""Improved consistency training, iCT (Song & Dhariwal 2024, "Improved Techniques for Training
Consistency Models"; no official code).

Consistency training (objectives/consistency_training.py) with the paper's changes:
- pseudo-Huber metric on the full norm, sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(dim)
  (Sec. 3.3);
- no target EMA: theta- = sg(theta) (Sec. 3.2);
- exponential curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1,
  K' = floor(K / (log2 floor(s1 / s0) + 1)), s0 = 10, s1 = 1280 (Sec. 3.4);
- the pair index i drawn from the log-normal proposal over the grid,
  p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) /
  (sqrt 2 P_std)), P_mean = -1.1, P_std = 2.0 (Sec. 3.5);
- weight lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) (Sec. 3.5).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from tesserax.core import registry
from tesserax.objectives import cd, consistency_training, edm
from tesserax.objectives.context import Objective


def num_scales(k, total_steps, s0, s1):
  """N(k) = min(s0 2^floor(k / K'), s1) + 1 (K' at least 1, for runs shorter than the
  curriculum's stages)."""
  k_prime = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
  return jnp.minimum(s0 * 2.0 ** jnp.floor(k / k_prime), s1) + 1


def proposal_logits(sigmas, n, p_mean, p_std):
  """log p(i) over pairs i = 0 .. len(sigmas) - 2 of the ascending grid `sigmas`, pairs with
  i >= n - 1 (beyond the N-point grid) excluded."""
  cdf = erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2) * p_std))
  mass = cdf[1:] - cdf[:-1]
  valid = jnp.arange(mass.shape[0]) < n - 1
  return jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def loss(apply, params, batch, ctx, *, settings, total_steps):
  x0, labels = batch["image"], batch["label"]
  key_i, key_z = jax.random.split(ctx.key)
  n = num_scales(ctx.step.astype(jnp.float32), total_steps, settings.s0, settings.s1)
  grid = functools.partial(edm.karras_sigmas, n=n, sigma_min=settings.sigma_min,
                           sigma_max=settings.sigma_max, rho=settings.rho)
  sigmas = grid(jnp.arange(settings.s1 + 1, dtype=jnp.float32))
  logits = proposal_logits(sigmas, n, settings.p_mean, settings.p_std)
  # Inverse-CDF draw: one uniform per example, not a Gumbel over every level of the grid.
  cdf = jnp.cumsum(jax.nn.softmax(logits))
  u = jax.random.uniform(key_i, (x0.shape[0],)) * cdf[-1]
  i = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), len(cdf) - 1)
  sigma, sigma_next = sigmas[i], sigmas[i + 1]
  z = jax.random.normal(key_z, x0.shape, x0.dtype)
  target = jax.lax.stop_gradient(params)
  d = cd.distillation_distance(cd.student(apply, params, labels, settings, train=True),
                               cd.student(apply, target, labels, settings, train=True),
                               consistency_training.training_step(x0, z), x0, z, sigma,
                               sigma_next,
                               edm.metric_distance("pseudo_huber", ctx, settings.get("huber_c")))
  total = jnp.mean(d / (sigma_next - sigma))
  return total, {"loss": total, "num_scales": n}


@registry.OBJECTIVES.register("ict")
def make(config) -> Objective:
  """config.objective: s0, s1, p_mean, p_std, sigma_min, sigma_max, rho, sigma_data, huber_c
  (None: 0.00054 sqrt(dim)); K = config.num_steps."""
  s = config.objective
  return Objective(loss=functools.partial(loss, settings=s, total_steps=config.num_steps),
                   predictions=cd.predictions(s))


def defaults(**overrides):
  """The paper's CIFAR-10 settings, as a config.objective dict."""
  return dict(dict(name="ict", s0=10, s1=1280, p_mean=-1.1, p_std=2.0, sigma_min=0.002,
              sigma_max=80.0, rho=7.0, sigma_data=0.5, huber_c=None), **overrides)
