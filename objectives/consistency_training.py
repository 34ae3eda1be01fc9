"""Consistency training (Song et al. 2023, Alg. 3; openai/consistency_models_cifar10
jcm/losses.py with dsm_target=True, get_ema_scales_fn "progressive").

CD with the teacher step replaced by the one-sample estimate D = x0: the pair shares its noise,
x_{n+1} = x0 + sigma_{n+1} z and x_n = x0 + sigma_n z. The grid grows and the target EMA rate
rises with the training step k of K (the code's adaptive schedule):

  scales(k) = max(ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1), 1),   N(k) = scales + 1,
  mu(k) = exp(s0 ln(mu0) / scales)

(so mu(0) = mu0^2 = 0.81 for s0 = 2, not mu0). CIFAR-10: s0 = 2, s1 = 150, mu0 = 0.9, K = 800k,
LPIPS; here l2, l1 or pseudo-Huber. The task keeps one EMA, at config.ema_decay: `target="ema"`
uses it, and `ema_rate` is mu(k) for a task that keeps a target EMA of its own.
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.objectives import cd, edm
from tesserax.objectives.context import Objective


def num_scales(k, total_steps, s0, s1):
  """N(k) = scales(k) + 1."""
  scales = jnp.ceil(jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1)
  return jnp.maximum(scales, 1) + 1


def ema_rate(k, total_steps, s0, s1, mu0):
  """mu(k) = exp(s0 ln(mu0) / scales(k))."""
  return jnp.exp(s0 * jnp.log(mu0) / (num_scales(k, total_steps, s0, s1) - 1))


def training_step(x0, z):
  """The teacher step of consistency training: x0 + sigma z with the pair's own noise."""
  return lambda x, sigma_from, sigma_to: x0 + edm.per_example(sigma_to, x0) * z


def loss(apply, params, batch, ctx, *, settings, total_steps):
  x0, labels = batch["image"], batch["label"]
  key_n, key_z = jax.random.split(ctx.key)
  n = num_scales(ctx.step.astype(jnp.float32), total_steps, settings.s0, settings.s1)
  u = jax.random.uniform(key_n, (x0.shape[0],))
  i = jnp.floor(u * (n - 1))  # U{0, ..., N - 2}
  grid = functools.partial(edm.karras_sigmas, n=n, sigma_min=settings.sigma_min,
                           sigma_max=settings.sigma_max, rho=settings.rho)
  z = jax.random.normal(key_z, x0.shape, x0.dtype)
  target = edm.target_params(params, ctx, settings.target)
  d = cd.distillation_distance(cd.student(apply, params, labels, settings, train=True),
                               cd.student(apply, target, labels, settings, train=True),
                               training_step(x0, z), x0, z, grid(i), grid(i + 1),
                               edm.metric_distance(settings.metric, ctx, settings.get("huber_c")))
  total = jnp.mean(d)
  return total, {"loss": total, "num_scales": n}


@registry.OBJECTIVES.register("ct")
def make(config) -> Objective:
  """config.objective: s0, s1, mu0, sigma_min, sigma_max, rho, sigma_data, metric, huber_c,
  target; K = config.num_steps."""
  s = config.objective
  edm.check_metric(config, "ct")
  edm.check_choice("ct", "target", s.target, ("online", "ema"))
  return Objective(loss=functools.partial(loss, settings=s, total_steps=config.num_steps),
                   predictions=cd.predictions(s))


def defaults(**overrides):
  """The CIFAR-10 settings (cifar10_ve_ct_adaptive.py), as a config.objective dict."""
  return dict(dict(name="ct", s0=2, s1=150, mu0=0.9, sigma_min=0.002, sigma_max=80.0, rho=7.0,
              sigma_data=0.5, metric="l2", huber_c=None, target="ema", perceptual=""),
              **overrides)
