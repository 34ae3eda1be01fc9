"""Improved MeanFlow, iMF (Geng, Lu, Wu, Shechtman, Kolter, He 2025; the official JAX code
Lyy-iiis/imeanflow, imf.py and models/imfDiT.py).

What changes from MeanFlow (objectives/meanflow.py), in tesserax's convention (z_t = (1 - t) x +
t eps, t = 1 noise, v = eps - x), with the network fed h = t - r as its second time:
- a v-loss: the compound V = u(z, r, t) + (t - r) sg(du/dt) regresses the guided velocity
  v_g, and an auxiliary velocity head v(z, t) regresses it too; both per-example sums over
  pixels with MeanFlow's adaptive weight (eps 0.01, p 1);
- du/dt from one `jax.jvp` of (z, t, r) -> u with tangents (v_c, 1, 0): v_c is the network's
  own conditional velocity (its velocity head at h = 0), not eps - x;
- the guidance scale omega and the guidance interval [t_min, t_max] are network conditions,
  drawn per example: omega = (1 + s_max)^U, U ~ U[0, 1], s_max = 7 (log-uniform on [1, 8]:
  `sample_cfg_scale` with beta = 1), t_min ~ U(0, 0.5), t_max ~ U(0.5, 1), and [0, 1] for the
  flow-matching examples (r = t, the first floor(data_proportion B) = 50% of the batch);
- the target v_g = v + (1 - 1/omega)(v_c - v_u), v_c and v_u the velocity head with the label
  and with the null label (omega 1), both at h = 0 and interval [0, 1]; outside [t_min, t_max]
  omega is 1 (no guidance) except on flow-matching examples, which ignore the interval; the
  first Binomial(B, class_dropout) examples get the null label and v_g = v.
The network takes (omega, t_min, t_max) through `guidance=` (generators/dit.py
`guidance_conditions`: omega embedded as 1 - 1/omega, as imfDiT does; tesserax adds the
embeddings to the adaLN conditioning where imfDiT prepends in-context tokens) and returns
[u | v] along channels (`velocity_head_depth` > 0: the last blocks are duplicated into a
velocity branch, imfDiT's aux heads; `learn_sigma` off).

Predictions: `flow_map` X(z, t, s) = z - (t - s) u(z, s, t) and `velocity` u(z, t, t), both at
the sampling guidance `objective.sample_omega` and `objective.sample_interval` (the official
B/2 evaluation: omega 7.5 to 8, [0.4, 0.65]) as network conditions; the sampler's own
cfg_scale stays 1.
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Objective
from tesserax.objectives.meanflow import adaptive_weighted, drop_first_labels, sample_times


def _expand(a, x):
  return a.reshape((-1,) + (1,) * (x.ndim - 1))


def heads(out, channels):
  """(u, v): the average-velocity output and the auxiliary velocity head's."""
  return out[..., :channels], out[..., channels:2 * channels]


def sample_guidance(key, fm, s_max):
  """(omega, t_min, t_max) [B]: omega = (1 + s_max)^U; [t_min, t_max] = [0, 1] where `fm`."""
  key_w, key_lo, key_hi = jax.random.split(key, 3)
  omega = jnp.exp(jax.random.uniform(key_w, fm.shape) * jnp.log1p(s_max))
  t_min = jnp.where(fm, 0.0, jax.random.uniform(key_lo, fm.shape, maxval=0.5))
  t_max = jnp.where(fm, 1.0, jax.random.uniform(key_hi, fm.shape, minval=0.5))
  return omega, t_min, t_max


def compound_velocity(u_fn, z, t, r, tangent):
  """(V, v) = (u + (t - r) sg(du/dt), the velocity head) with du/dt along (tangent, 1, 0);
  `u_fn(z, t, r) -> (u, v)`."""
  u, du_dt, v = jax.jvp(u_fn, (z, t, r), (tangent, jnp.ones_like(t), jnp.zeros_like(r)),
                        has_aux=True)
  return u + _expand(t - r, z) * jax.lax.stop_gradient(du_dt), v


def guided_target(v_head, v, z, t, labels, null_label, fm, omega, t_min, t_max):
  """(v_g, v_c): the guided target and the conditional velocity the JVP moves along
  (imf.py `guidance_fn`); `v_head(z, t, omega, labels)` is the network's velocity head at
  h = 0 and interval [0, 1]."""
  both = v_head(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                jnp.concatenate([omega, jnp.ones_like(omega)]),
                jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
  v_c, v_u = jnp.split(both, 2)
  g = lambda w, v_c: v + _expand(1 - 1 / w, z) * (v_c - v_u)
  v_g_fm = g(omega, v_c)
  omega = jnp.where((t >= t_min) & (t <= t_max), omega, 1.0)
  v_c = v_head(z, t, omega, labels)
  v_g = jnp.where(_expand(fm, z), v_g_fm, g(omega, v_c))
  return jax.lax.stop_gradient(v_g), jax.lax.stop_gradient(v_c)


def network(apply, params):
  """(z, t, h, omega, t_min, t_max, labels) -> (u, v) of the network."""
  def net(z, t, h, omega, t_min, t_max, labels):
    return heads(apply(params, z, t, labels, s=h, guidance=(omega, t_min, t_max)), z.shape[-1])
  return net


def loss(apply, params, batch, ctx, *, settings, class_dropout):
  x, labels = batch["image"], batch["label"]
  b = x.shape[0]
  key_t, key_eps, key_g, key_drop = jax.random.split(ctx.key, 4)
  t, r = sample_times(key_t, b, settings)
  fm = jnp.arange(b) < int(settings.data_proportion * b)
  eps = jax.random.normal(key_eps, x.shape, x.dtype)
  z = (1 - _expand(t, x)) * x + _expand(t, x) * eps
  v = eps - x
  omega, t_min, t_max = sample_guidance(key_g, fm, settings.cfg_s_max)
  net = network(apply, params)
  v_head = lambda z, t, w, y: net(z, t, jnp.zeros_like(t), w, jnp.zeros_like(t),
                                  jnp.ones_like(t), y)[1]
  v_g, v_c = guided_target(v_head, v, z, t, labels, ctx.num_classes, fm, omega, t_min, t_max)
  labels, dropped = drop_first_labels(key_drop, labels, class_dropout, ctx.num_classes)
  v_g = jnp.where(_expand(dropped, x), v, v_g)
  u_fn = lambda z, t, r: net(z, t, t - r, omega, t_min, t_max, labels)
  compound, v_pred = compound_velocity(u_fn, z, t, r, v_c)
  sum_sq = lambda a: jnp.sum(jnp.square(a - v_g), axis=tuple(range(1, x.ndim)))
  p, eps_w = settings.adaptive_p, settings.adaptive_eps
  loss_u = adaptive_weighted(sum_sq(compound), p, eps_w)
  loss_v = adaptive_weighted(sum_sq(v_pred), p, eps_w)
  total = jnp.mean(loss_u + loss_v)
  return total, {"loss": total, "loss_u": jnp.mean(sum_sq(compound)) / x[0].size,
                 "loss_v": jnp.mean(sum_sq(v_pred)) / x[0].size}


def flow_map(apply, params, z, t, s, labels, *, omega, interval):
  """X(z, t, s) = z - (t - s) u(z, s, t) at the sampling guidance conditions."""
  cond = lambda value: jnp.full_like(t, value)
  u, _ = network(apply, params)(z, t, t - s, cond(omega), cond(interval[0]), cond(interval[1]),
                                labels)
  return z - _expand(t - s, z) * u


def velocity(apply, params, z, t, labels, *, omega, interval):
  """u(z, t, t) at the sampling guidance conditions."""
  cond = lambda value: jnp.full_like(t, value)
  return network(apply, params)(z, t, jnp.zeros_like(t), cond(omega), cond(interval[0]),
                                cond(interval[1]), labels)[0]


@registry.OBJECTIVES.register("imf")
def make(config) -> Objective:
  """config.objective: time_mean, time_std, data_proportion, adaptive_p, adaptive_eps,
  cfg_s_max, sample_omega, sample_interval; labels dropped with config.model.class_dropout."""
  model = config.model
  if not (model.get("second_time", False) and model.get("guidance_conditions", False)
          and model.get("velocity_head_depth", 0) > 0 and not model.get("learn_sigma", False)):
    raise TesseraxError("objective imf needs a network with a second time input, guidance "
                        "conditions and a velocity head (model.second_time=True, "
                        "guidance_conditions=True, velocity_head_depth>0, learn_sigma=False)")
  settings = config.objective
  kinds = dict(omega=settings.sample_omega, interval=tuple(settings.sample_interval))
  return Objective(
      loss=functools.partial(loss, settings=settings, class_dropout=model.class_dropout),
      predictions={"flow_map": functools.partial(flow_map, **kinds),
                   "velocity": functools.partial(velocity, **kinds)})
