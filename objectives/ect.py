"""Easy consistency tuning, ECT (Geng et al. 2024, "Consistency Models Made Easy";
locuslab/ect training/loss.py ECMLoss, main and imgnet branches).

Continuous-time consistency training started from a trained diffusion / flow model:
sigma_t = exp(P_mean + P_std n), n ~ N(0, 1) (P_mean = -1.1, P_std = 2.0), and the nearer level
follows the "sigmoid" mapping with a gap that shrinks by q every `double_every` steps,

  r = max(sigma_t (1 - q^-(stage + 1) (1 + k sigmoid(-b sigma_t))), 0),
  stage = floor(step / double_every),   k = 8, b = 1, q = 2;

  loss = d(f(y + sigma_t eps, sigma_t), sg f(y + r eps, r)) w,

the same eps in both, the target y itself where r = 0, d the L2 norm (pseudo-Huber if c > 0),
w = 1 / (sigma_t - r) ("gap", CIFAR-10) or 1 / sigma_t^2 + 1 / sigma_data^2 ("snrpk", the
ImageNet-64 branch). theta- is the online network. ECT shares the dropout mask between the two
passes; tesserax's networks have no dropout. The CIFAR-10 recipe (run_ecm.sh): RAdam lr 1e-4,
batch 128, EMA 0.9999, 200k steps, a stage every 25k steps; 2-step sampling through 0.821
(1.526 on ImageNet-64).
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.objectives import cd, edm
from tesserax.objectives.context import Objective


def nearer_sigma(t, stage, q, k, b):
  """r(t): the sigmoid mapping of ECT at a stage, clamped at 0."""
  return jnp.maximum(t * (1 - q ** -(stage + 1.0) * (1 + k * jax.nn.sigmoid(-b * t))), 0.0)


def weight(t, r, weighting, sigma_data):
  if weighting == "gap":
    return 1 / (t - r)
  return 1 / t ** 2 + 1 / sigma_data ** 2


def loss(apply, params, batch, ctx, *, settings):
  x0, labels = batch["image"], batch["label"]
  key_t, key_eps = jax.random.split(ctx.key)
  t = jnp.exp(settings.p_mean + settings.p_std * jax.random.normal(key_t, (x0.shape[0],)))
  stage = jnp.floor(ctx.step / settings.double_every)
  r = nearer_sigma(t, stage, settings.q, settings.k, settings.b)
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
  f = cd.student(apply, params, labels, settings, train=True)
  f_target = cd.student(apply, jax.lax.stop_gradient(params), labels, settings, train=True)
  at = lambda sigma: x0 + edm.per_example(sigma, x0) * eps
  positive = edm.per_example(r > 0, x0)
  target = jnp.where(positive, f_target(at(r), jnp.where(r > 0, r, 1.0)), x0)
  d = edm.distance(f(at(t), t) - jax.lax.stop_gradient(target), "pseudo_huber", settings.huber_c)
  total = jnp.mean(jnp.nan_to_num(d * weight(t, r, settings.weighting, settings.sigma_data)))
  return total, {"loss": total, "stage": stage}


@registry.OBJECTIVES.register("ect")
def make(config) -> Objective:
  """config.objective: p_mean, p_std, q, k, b, double_every, weighting (gap, snrpk), huber_c
  (0: the L2 norm), sigma_min, sigma_data."""
  s = config.objective
  edm.check_choice("ect", "weighting", s.weighting, ("gap", "snrpk"))
  return Objective(loss=functools.partial(loss, settings=s), predictions=cd.predictions(s))


def defaults(**overrides):
  """The CIFAR-10 settings (run_ecm.sh; a stage every 25k steps), as a config.objective dict."""
  return dict(dict(name="ect", p_mean=-1.1, p_std=2.0, q=2.0, k=8.0, b=1.0, double_every=25000,
              weighting="gap", huber_c=0.0, sigma_min=0.002, sigma_data=0.5), **overrides)
