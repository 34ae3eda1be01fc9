"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"; the official JAX
code Gsunshine/meanflow, meanflow.py).

The network models the average velocity u(z, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau
between a time t and an earlier (less noisy) time r <= t, in tesserax's convention (z_t =
(1 - t) x + t eps, t = 1 noise, v = eps - x), fed as `net(z, t, labels, s=h)` with h = t - r
(the official `net(z, t, h, y)`; the network needs `model.second_time`). The MeanFlow identity
u = v - (t - r) du/dt, with du/dt = v . d_z u + d_t u, gives the regression target

  u_tgt = sg(v_g - clip(t - r, 0, 1) du/dt),

du/dt from one `jax.jvp` of (z, t, r) -> u(z, r, t) with tangents (v_g, 1, 0) (h = t - r moves
with t inside the closure). Per example the squared error is summed over pixels and divided by
sg(error + eps)^p (adaptive weighting, p = 1, eps = 0.01), then averaged.

Official sampling of the batch (meanflow.py): t and r are two independent logit-normal draws
(mean -0.4, std 1.0), sorted so that r <= t; the first floor(data_proportion B) positions
(0.75) get r = t, plain flow matching. The number of dropped labels is Binomial(B, dropout)
and the first that-many positions get the null label. Guidance is folded into the target:
v_g = omega v + (1 - omega - kappa) v_u + kappa v_c with v_c, v_u the network's own
instantaneous velocities u(z, t, t) (stop-gradient) for t in the guidance interval, and v_g = v
for dropped labels and outside it (omega 1, kappa 0.5 in the ImageNet B/4 recipe: effective
scale omega / (1 - kappa) = 2).

Predictions: `flow_map` X(z, t, s) = z - (t - s) u(z, s, t), the jump the flow-map samplers
chain (one step: X(eps, 1, 0)); and `velocity` u(z, t, t), so the flow solvers also apply.
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Objective


def sample_times(key, batch_size, settings):
  """(t, r) [B]: sorted logit-normal pairs, the first floor(data_proportion B) with r = t."""
  normal = jax.random.normal(key, (2, batch_size))
  draws = jax.nn.sigmoid(settings.time_mean + settings.time_std * normal)
  t, r = jnp.max(draws, 0), jnp.min(draws, 0)
  same = jnp.arange(batch_size) < int(settings.data_proportion * batch_size)
  return t, jnp.where(same, t, r)


def drop_first_labels(key, labels, class_dropout, num_classes):
  """The null label on the first n positions, n ~ Binomial(B, class_dropout); also the mask."""
  n = jnp.sum(jax.random.uniform(key, labels.shape) < class_dropout)
  dropped = jnp.arange(labels.shape[0]) < n
  return jnp.where(dropped, num_classes, labels), dropped


def average_velocity(apply, params, labels):
  """(z, t, r) -> u(z, r, t): the network fed h = t - r as its second time."""
  return lambda z, t, r: apply(params, z, t, labels, s=t - r)[..., :z.shape[-1]]


def target(u_fn, z, t, r, v):
  """(u, u_tgt): the prediction u(z, r, t) and the stop-gradient MeanFlow target
  v - clip(t - r, 0, 1) du/dt, du/dt along the tangent (v, 1, 0)."""
  u, du_dt = jax.jvp(u_fn, (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
  gap = jnp.clip(t - r, 0.0, 1.0).reshape((-1,) + (1,) * (z.ndim - 1))
  return u, jax.lax.stop_gradient(v - gap * du_dt)


def adaptive_weighted(error, p, eps):
  """error / sg(error + eps)^p per example (MeanFlow's adaptive loss weighting)."""
  return error / jax.lax.stop_gradient(error + eps) ** p


def loss(apply, params, batch, ctx, *, settings, class_dropout):
  x, labels = batch["image"], batch["label"]
  key_t, key_eps, key_drop = jax.random.split(ctx.key, 3)
  t, r = sample_times(key_t, x.shape[0], settings)
  eps = jax.random.normal(key_eps, x.shape, x.dtype)
  tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
  z = (1 - tb) * x + tb * eps
  v = eps - x
  labels, dropped = drop_first_labels(key_drop, labels, class_dropout, ctx.num_classes)
  omega, kappa = settings.cfg_omega, settings.cfg_kappa
  if omega != 1.0 or kappa != 0.0:
    instantaneous = lambda y: jax.lax.stop_gradient(average_velocity(apply, params, y)(z, t, t))
    v_c, v_u = instantaneous(labels), instantaneous(jnp.full_like(labels, ctx.num_classes))
    lo, hi = settings.cfg_interval
    guided = (~dropped & (t >= lo) & (t <= hi)).reshape(tb.shape)
    v = jnp.where(guided, omega * v + (1 - omega - kappa) * v_u + kappa * v_c, v)
  u, u_tgt = target(average_velocity(apply, params, labels), z, t, r, v)
  error = jnp.sum(jnp.square(u - u_tgt), axis=tuple(range(1, x.ndim)))
  total = jnp.mean(adaptive_weighted(error, settings.adaptive_p, settings.adaptive_eps))
  return total, {"loss": total, "mse": jnp.mean(error) / (x[0].size)}


def flow_map(apply, params, z, t, s, labels):
  """X(z, t, s) = z - (t - s) u(z, s, t): the state at time s of the flow through z at t."""
  gap = (t - s).reshape((-1,) + (1,) * (z.ndim - 1))
  return z - gap * average_velocity(apply, params, labels)(z, t, s)


def velocity(apply, params, z, t, labels):
  """The instantaneous velocity u(z, t, t)."""
  return average_velocity(apply, params, labels)(z, t, t)


@registry.OBJECTIVES.register("meanflow")
def make(config) -> Objective:
  """config.objective: time_mean, time_std, data_proportion, adaptive_p, adaptive_eps,
  cfg_omega, cfg_kappa, cfg_interval; labels dropped with config.model.class_dropout."""
  if not config.model.get("second_time", False):
    raise TesseraxError("objective meanflow needs a network with a second time input "
                        "(model.second_time=True)")
  return Objective(
      loss=functools.partial(loss, settings=config.objective,
                             class_dropout=config.model.class_dropout),
      predictions={"flow_map": flow_map, "velocity": velocity})
