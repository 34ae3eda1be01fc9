"""Consistency trajectory models, CTM (Kim et al. 2024, "Consistency Trajectory Models"; sony/ctm).

G(x_t, t, s) jumps along the PF-ODE from level t to any s <= t. Its "euler" outer
parameterisation (get_outer_scalings) in EDM sigmas, G = (s/t) x + (1 - s/t) g(x, t, s), with
g the denoiser of a network with a second time input, is in tesserax's flow time exactly
X(x_t, t, s) = x_t - (t - s) v(x_t, t, s) (the two agree under sigma = t / (1 - t),
x_sigma = x_t / (1 - t)); G(x, t, t) = x.

Losses (Sec. 4):
- soft consistency matching: on the ascending N-point Karras grid draw t (index >= 1), s below
  t and u the grid level below t; the teacher (the frozen flow model as an EDM denoiser) takes
  one Heun step from t to u, and the two estimates of level s are compared after the target
  network maps both to 0:
    d(G-(G_theta(x_t, t, s), s, 0), sg G-(G-(x_u, u, s), s, 0)),
  G- the target network (the trainer's EMA; the official code keeps a 0.999 target EMA);
  l2, l1, pseudo-Huber or "perceptual", the paper's LPIPS (the task's `objective.perceptual`);
- denoising score matching on g(x, sigma, sigma) with EDM's log-normal sigma (P_mean -1.2,
  P_std 1.2) and weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, scaled by `dsm_weight`.
The optional GAN term is not implemented.

Predictions: `flow_map` X(x_t, t, s) (sampling/consistency.py's gamma-sampling and the
flow-map sampler), `denoiser` G(x, sigma, 0) and `velocity` v(x_t, t, t).
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives import edm
from tesserax.objectives.context import Objective


def flow_map(apply, params, x, t, s, labels, *, train=False):
  """X(x_t, t, s) = x_t - (t - s) v(x_t, t, s) in flow time."""
  v = apply(params, x, t, labels, train=train, s=s)[..., :x.shape[-1]]
  return x - edm.per_example(t - s, x) * v


def instantaneous_velocity(apply, params, labels, *, train=False):
  """(x_t, t) -> v(x_t, t, t): the network with s = t, whose denoiser g(x, t, t) DSM trains."""
  return lambda x, t: apply(params, x, t, labels, train=train, s=t)[..., :x.shape[-1]]


def jump(apply, params, labels, *, train=False):
  """G(x, sigma_t, sigma_s) in EDM sigmas (sigma_s = 0 allowed)."""

  def g(x, sigma_t, sigma_s):
    x_t = x / edm.per_example(1 + sigma_t, x)
    x_s = flow_map(apply, params, x_t, edm.sigma_to_t(sigma_t), edm.sigma_to_t(sigma_s), labels,
                   train=train)
    return x_s * edm.per_example(1 + sigma_s, x)

  return g


def loss(apply, params, batch, ctx, *, settings):
  x0, labels = batch["image"], batch["label"]
  b, n = x0.shape[0], settings.num_scales
  key_t, key_s, key_z, key_dsm, key_eps = jax.random.split(ctx.key, 5)
  i_t = jax.random.randint(key_t, (b,), 1, n)
  i_s = jnp.floor(jax.random.uniform(key_s, (b,)) * i_t)  # U{0, ..., i_t - 1}
  grid = functools.partial(edm.karras_sigmas, n=n, sigma_min=settings.sigma_min,
                           sigma_max=settings.sigma_max, rho=settings.rho)
  sigma_t, sigma_u, sigma_s = grid(i_t.astype(jnp.float32)), grid(i_t - 1.0), grid(i_s)
  zeros = jnp.zeros_like(sigma_t)
  z = jax.random.normal(key_z, x0.shape, x0.dtype)
  x_t = x0 + edm.per_example(sigma_t, x0) * z
  teacher = edm.denoiser_from_velocity(edm.teacher_velocity(ctx, labels))
  x_u = jax.lax.stop_gradient(edm.heun_step(teacher, x_t, sigma_t, sigma_u))
  g_theta = jump(apply, params, labels, train=True)
  g_target = jump(apply, edm.target_params(params, ctx, settings.target), labels, train=True)
  estimate = g_target(g_theta(x_t, sigma_t, sigma_s), sigma_s, zeros)
  target = jax.lax.stop_gradient(g_target(g_target(x_u, sigma_u, sigma_s), sigma_s, zeros))
  distance = edm.metric_distance(settings.metric, ctx, settings.get("huber_c"))
  ctm = jnp.mean(distance(estimate, target))
  sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(key_dsm, (b,)))
  x = x0 + edm.per_example(sigma, x0) * jax.random.normal(key_eps, x0.shape, x0.dtype)
  denoised = edm.denoiser_from_velocity(
      instantaneous_velocity(apply, params, labels, train=True))(x, sigma)
  sd = settings.sigma_data
  dsm_weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
  dsm = jnp.mean(dsm_weight * jnp.mean(jnp.square(denoised - x0), axis=tuple(range(1, x0.ndim))))
  total = ctm + settings.dsm_weight * dsm
  return total, {"loss": total, "ctm": ctm, "dsm": dsm}


def denoiser(apply, params, x, sigma, labels):
  """The `denoiser` prediction: G(x, sigma, 0)."""
  return jump(apply, params, labels)(x, sigma, jnp.zeros_like(sigma))


def velocity(apply, params, x, t, labels):
  return instantaneous_velocity(apply, params, labels)(x, t)


@registry.OBJECTIVES.register("ctm")
def make(config) -> Objective:
  """config.objective: num_scales, sigma_min, sigma_max, rho, sigma_data, metric (l2, l1,
  pseudo_huber, perceptual), huber_c, target (online, ema), dsm_weight, perceptual (lpips,
  digits_net); config.teacher.workdir the flow model distilled."""
  s = config.objective
  if not config.model.get("second_time", False):
    raise TesseraxError("objective ctm needs a network with a second time input "
                        "(model.second_time=True)")
  edm.check_teacher(config, "ctm")
  edm.check_metric(config, "ctm")
  edm.check_choice("ctm", "target", s.target, ("online", "ema"))
  return Objective(loss=functools.partial(loss, settings=s),
                   predictions={"flow_map": flow_map, "denoiser": denoiser,
                                "velocity": velocity})


def defaults(**overrides):
  """CIFAR-10-like settings (N = 18, EMA target, DSM weight 1), as a config.objective dict."""
  return dict(dict(name="ctm", num_scales=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
              sigma_data=0.5, metric="l2", huber_c=None, target="ema", dsm_weight=1.0, perceptual=""),
              **overrides)
