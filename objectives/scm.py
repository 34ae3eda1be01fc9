"""Continuous-time consistency models in TrigFlow, sCT and sCD (Lu & Song 2025, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models", Sec. 4-5 and Alg. 1; no official
code).

The network is read as TrigFlow's F(x_tau, tau) (objectives/edm.py); sigma ~ exp(N(P_mean,
P_std^2)), tau = arctan(sigma / sigma_d), z ~ N(0, sigma_d^2 I), x_tau = cos(tau) x0 +
sin(tau) z. The PF-ODE tangent dx/dtau is cos(tau) z - sin(tau) x0 (sCT) or sigma_d F_teacher
(sCD: the frozen flow teacher in TrigFlow form, guided with scale w: v_u + w (v_c - v_u)).
One `jax.jvp` of the stop-gradient network at (x_tau, tau) along (cos sin dx/dtau, cos sin)
gives F- and cos(tau) sin(tau) dF-/dtau (the paper's JVP rearrangement), and

  g = -cos^2(tau) (sigma_d F- - dx/dtau) - r (cos(tau) sin(tau) x_tau + sigma_d cos sin dF-/dtau),
  r = min(1, step / H) (tangent warm-up, H = 10k), g <- g / (||g|| + c) (normalisation,
  c = 0.1), and

  loss = w(tau) / (e^{u(tau)} D) ||F_theta - F- - g||^2 + u(tau),

u the learned log-variance (the network's `logvar_head`, generators/dit.py), D the dimension,
w = 1 / (sigma_d tan tau) the prior weight (on by default, as in the paper; xandergos/sCM-mnist
found it destabilising and used 1). CIFAR-10: sigma_d 0.5, P_mean -1.0, P_std 1.4 (the
ImageNet-64 recipe uses -1.0, 1.6); 2-step sampling through tau = 1.1 (sCM-mnist).
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives import edm
from tesserax.objectives.context import Objective


def warmup(step, steps):
  """r = min(1, step / H)."""
  return jnp.minimum(1.0, step / steps) if steps > 0 else jnp.float32(1.0)


def normalize(g, c):
  """g / (||g|| + c), the norm over each example."""
  norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))
  return g / edm.per_example(norm + c, g)


def tangent(trig_f, x, tau, dxdt, r, sigma_data):
  """(F-, g) from one JVP of trig_f(x, tau) along (cos sin dx/dtau, cos sin)."""
  cs = jnp.cos(tau) * jnp.sin(tau)
  f_minus, df = jax.jvp(trig_f, (x, tau), (edm.per_example(cs, x) * dxdt, cs))
  cos2 = edm.per_example(jnp.cos(tau) ** 2, x)
  g = (-cos2 * (sigma_data * f_minus - dxdt)
       - r * (edm.per_example(cs, x) * x + sigma_data * df))
  return f_minus, g


def guided_teacher_velocity(ctx, labels, scale):
  """The teacher's velocity with classifier-free guidance v_u + w (v_c - v_u)."""
  conditional = edm.teacher_velocity(ctx, labels)
  if scale == 1.0:
    return conditional
  unconditional = edm.teacher_velocity(ctx, jnp.full_like(labels, ctx.num_classes))
  return lambda x, t: (unconditional(x, t)
                       + scale * (conditional(x, t) - unconditional(x, t)))


def loss(apply, params, batch, ctx, *, settings, distill):
  x0, labels = batch["image"], batch["label"]
  sd = settings.sigma_data
  key_s, key_z = jax.random.split(ctx.key)
  sigma = jnp.exp(settings.p_mean + settings.p_std * jax.random.normal(key_s, (x0.shape[0],)))
  tau = jnp.arctan(sigma / sd)
  z = sd * jax.random.normal(key_z, x0.shape, x0.dtype)
  cos, sin = edm.per_example(jnp.cos(tau), x0), edm.per_example(jnp.sin(tau), x0)
  x = cos * x0 + sin * z
  if distill:
    teacher = guided_teacher_velocity(ctx, labels, settings.teacher_cfg)
    dxdt = jax.lax.stop_gradient(sd * edm.trigflow_from_velocity(teacher, sd)(x, tau))
  else:
    dxdt = cos * z - sin * x0
  out = apply(params, *edm.trigflow_network_inputs(x, tau, sd), labels, train=True)
  channels = x0.shape[-1]
  f_theta = edm.trigflow_output(x, tau, out[..., :channels], sd)
  logvar = out[:, 0, 0, -1]
  frozen = edm.network_velocity(apply, jax.lax.stop_gradient(params), labels, train=True)
  r = warmup(ctx.step, settings.warmup_steps)
  f_minus, g = tangent(edm.trigflow_from_velocity(frozen, sd), x, tau, dxdt, r, sd)
  if settings.get("tangent_normalization", True):
    g = normalize(g, settings.tangent_c)
  g = jax.lax.stop_gradient(g)
  mse = jnp.mean(jnp.square(f_theta - jax.lax.stop_gradient(f_minus) - g),
                 axis=tuple(range(1, x0.ndim)))
  prior = 1 / (sd * jnp.tan(tau)) if settings.prior_weighting else 1.0
  total = jnp.mean(prior * jnp.exp(-logvar) * mse + logvar)
  return total, {"loss": total, "mse": jnp.mean(mse), "tangent_warmup": r}


def predictions(settings):
  return {"denoiser": functools.partial(edm.consistency_prediction, sigma_min=0.0,
                                        sigma_data=settings.sigma_data)}


def _make(config, name, distill):
  s = config.objective
  if not config.model.get("logvar_head", False):
    raise TesseraxError(f"objective {name} learns its loss weighting: it needs a network with "
                        "a log-variance head (model.logvar_head=True)")
  if distill:
    edm.check_teacher(config, name)
  return Objective(loss=functools.partial(loss, settings=s, distill=distill),
                   predictions=predictions(s))


@registry.OBJECTIVES.register("sct")
def make_sct(config) -> Objective:
  """config.objective: sigma_data, p_mean, p_std, warmup_steps, tangent_normalization (off:
  the raw tangents of the paper's Fig. 5a ablation), tangent_c, prior_weighting."""
  return _make(config, "sct", distill=False)


@registry.OBJECTIVES.register("scd")
def make_scd(config) -> Objective:
  """As sct, plus teacher_cfg (the teacher's guidance scale); config.teacher.workdir."""
  return _make(config, "scd", distill=True)


def defaults(name="sct", **overrides):
  """The CIFAR-10 settings, as a config.objective dict."""
  return dict(dict(name=name, sigma_data=0.5, p_mean=-1.0, p_std=1.4, warmup_steps=10000,
              tangent_normalization=True, tangent_c=0.1, prior_weighting=True, teacher_cfg=1.0),
              **overrides)
