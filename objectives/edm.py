"""The consistency-model parameterisations over a flow-time network (the DiT family).

Consistency objectives work in the EDM variance-exploding convention (Karras et al. 2022):
x_sigma = x0 + sigma eps, sigma in [sigma_min, sigma_max]. tesserax's networks take flow time
(x_t = (1 - t) x0 + t eps, t = 1 noise, DESIGN.md), and the two are one change of variables,
sigma = t / (1 - t) and x_t = x_sigma / (1 + sigma) (rfpp's EDMPrecondVel, run backwards). So
a flow network is an EDM denoiser with input scaling c_in = 1 / (1 + sigma), noise
conditioning c_noise = t and, since x0 = x_t - t v,

  D(x, sigma) = (x - sigma v(x / (1 + sigma), t)) / (1 + sigma)           (exact, no fit)

and a trained rectified-flow model converts without touching its weights: students (CD, ECT,
sCM) start from the teacher's parameters and predict the teacher's denoiser.

Consistency function (Song et al. 2023, App. C; openai/consistency_models_cifar10
jcm/models/utils.py get_distiller_fn): f = c_skip x + c_out F with the network output F of the
EDM denoiser D = c_skip^0 x + c_out^0 F (the sigma_min = 0 scalings) and

  c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
  c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2),

so f = c_skip x + (1 - sigma_min / sigma) (D - c_skip^0 x), and f(x, sigma_min) = x exactly.

TrigFlow (Lu & Song 2025, sCM, Sec. 2): x_tau = cos(tau) x0 + sin(tau) z, z ~ N(0, sigma_d^2 I),
tau in [0, pi/2]; sigma = sigma_d tan(tau), x_sigma = x_tau / cos(tau); the PF-ODE is
dx_tau/dtau = sigma_d F(x_tau, tau) and the consistency function f = cos(tau) x_tau -
sin(tau) sigma_d F. With k = cos(tau) + sigma_d sin(tau) the flow network gives
F = ((sigma_d cos tau - sin tau) x + sigma_d v(x / k, sigma_d sin(tau) / k)) / (sigma_d k).
"""
import jax
import jax.numpy as jnp

from tesserax.core.errors import TesseraxError


def per_example(a, x):
  """a [B] broadcast against x [B, ...]."""
  return jnp.reshape(a, (-1,) + (1,) * (x.ndim - 1))


def sigma_to_t(sigma):
  return sigma / (1 + sigma)


def karras_sigmas(i, n, sigma_min, sigma_max, rho=7.0):
  """sigma_i of the N-point Karras grid, ascending (i = 0: sigma_min, i = N - 1: sigma_max;
  iCT Sec. 3.1). i and n may be traced."""
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (lo + i / (n - 1) * (hi - lo)) ** rho


def network_velocity(apply, params, labels, *, train=False):
  """(x_t, t) -> the network's velocity (its first C channels)."""
  return lambda x, t: apply(params, x, t, labels, train=train)[..., :x.shape[-1]]


def denoiser_from_velocity(velocity):
  """velocity(x_t, t) -> D(x, sigma), the exact EDM denoiser of a flow model."""

  def denoise(x, sigma):
    scale = per_example(1 + sigma, x)
    return (x - per_example(sigma, x) * velocity(x / scale, sigma_to_t(sigma))) / scale

  return denoise


def consistency_function(denoise, sigma_min, sigma_data):
  """D(x, sigma) -> f(x, sigma) with the boundary condition f(x, sigma_min) = x."""

  def f(x, sigma):
    s = per_example(sigma, x)
    c_skip = sigma_data ** 2 / ((s - sigma_min) ** 2 + sigma_data ** 2)
    c_skip0 = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    return c_skip * x + (1 - sigma_min / s) * (denoise(x, sigma) - c_skip0 * x)

  return f


def trigflow_network_inputs(x, tau, sigma_data):
  """(x_t, t): the flow state and time of the TrigFlow state x at angle tau."""
  k = jnp.cos(tau) + sigma_data * jnp.sin(tau)
  return x / per_example(k, x), sigma_data * jnp.sin(tau) / k


def trigflow_output(x, tau, v, sigma_data):
  """F(x, tau) from the flow network's velocity v at trigflow_network_inputs(x, tau)."""
  cos, sin = jnp.cos(tau), jnp.sin(tau)
  k = per_example(cos + sigma_data * sin, x)
  return (per_example(sigma_data * cos - sin, x) * x + sigma_data * v) / (sigma_data * k)


def trigflow_from_velocity(velocity, sigma_data):
  """velocity(x_t, t) -> F(x_tau, tau), TrigFlow's network output (sigma_d F = dx_tau/dtau)."""
  return lambda x, tau: trigflow_output(
      x, tau, velocity(*trigflow_network_inputs(x, tau, sigma_data)), sigma_data)


def trigflow_consistency(trig_f, sigma_data):
  """F(x, tau) -> f(x, tau) = cos(tau) x - sin(tau) sigma_d F(x, tau)."""
  return lambda x, tau: (per_example(jnp.cos(tau), x) * x
                         - per_example(jnp.sin(tau), x) * sigma_data * trig_f(x, tau))


def teacher_velocity(ctx, labels):
  """(x_t, t) -> the frozen teacher's velocity (objectives/context.py)."""
  velocity, params = ctx.teacher
  return lambda x, t: jax.lax.stop_gradient(velocity(params, x, t, labels))


def euler_step(denoise, x, sigma, sigma_next):
  """One Euler step of the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
  d = (x - denoise(x, sigma)) / per_example(sigma, x)
  return x + per_example(sigma_next - sigma, x) * d


def heun_step(denoise, x, sigma, sigma_next):
  """One Heun step (EDM Alg. 1; the CD teacher of Song et al. 2023); sigma_next > 0."""
  d = (x - denoise(x, sigma)) / per_example(sigma, x)
  x_euler = x + per_example(sigma_next - sigma, x) * d
  d_next = (x_euler - denoise(x_euler, sigma_next)) / per_example(sigma_next, x)
  return x + per_example(sigma_next - sigma, x) * (d + d_next) / 2


TEACHER_STEPS = {"euler": euler_step, "heun": heun_step}


def distance(diff, metric, huber_c=None):
  """Per-example d(x, y) of diff = x - y [B, ...]: 'l2' the mean square, 'l1' the mean
  absolute value (jcm/losses.py), 'pseudo_huber' sqrt(||diff||^2 + c^2) - c on the full norm
  with c = 0.00054 sqrt(dim) unless given (iCT Sec. 3.3)."""
  axes = tuple(range(1, diff.ndim))
  if metric == "l2":
    return jnp.mean(jnp.square(diff), axis=axes)
  if metric == "l1":
    return jnp.mean(jnp.abs(diff), axis=axes)
  if metric == "pseudo_huber":
    c = 0.00054 * (diff[0].size ** 0.5) if huber_c is None else huber_c
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=axes) + c * c) - c
  raise TesseraxError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def consistency_prediction(apply, params, x, sigma, labels, *, sigma_min, sigma_data):
  """The `denoiser` prediction of a consistency model: f(x_sigma, sigma)."""
  velocity = network_velocity(apply, params, labels)
  return consistency_function(denoiser_from_velocity(velocity), sigma_min, sigma_data)(x, sigma)


METRICS = ("l2", "l1", "pseudo_huber")  # distances of the difference (`distance`)
PERCEPTUAL = "perceptual"  # the context's frozen perceptual distance (LPIPS; CD/CT's best)


def metric_distance(metric, ctx, huber_c=None):
  """(a, b) -> per-example d(a, b) of the metric: `distance(a - b)`, or for "perceptual" the
  context's frozen perceptual distance."""
  if metric == PERCEPTUAL:
    return ctx.perceptual
  return lambda a, b: distance(a - b, metric, huber_c)


def check_metric(config, objective):
  """Refuse objective.metric outside METRICS + perceptual, or perceptual without a network."""
  check_choice(objective, "metric", config.objective.metric, METRICS + (PERCEPTUAL,))
  if config.objective.metric == PERCEPTUAL and not config.objective.get("perceptual"):
    raise TesseraxError(f"objective {objective}: metric perceptual needs objective.perceptual "
                        "(lpips, or digits_net offline)")


def check_choice(objective, key, value, choices):
  """Refuse objective.KEY=value outside `choices` in one line."""
  if value not in choices:
    raise TesseraxError(f"objective {objective}: {key}={value!r}; choose from "
                        f"{', '.join(choices)}")


def check_teacher(config, objective):
  """Refuse a distillation recipe without a teacher in one line."""
  if not config.get("teacher", {}).get("workdir"):
    raise TesseraxError(f"objective {objective} distils a trained flow model; set "
                        "teacher.workdir to its workdir")


def target_params(params, ctx, target):
  """The target network theta^-: the online parameters ('online', stop-gradient; CD on
  CIFAR-10, iCT, ECT, sCM) or the trainer's EMA ('ema')."""
  return jax.lax.stop_gradient(params if target == "online" else ctx.ema)
