"""DDPM epsilon prediction with a learned-range variance: DiT's objective (diffusion/
gaussian_diffusion.py training_losses, from openai/improved-diffusion).

x_k = sqrt(ab_k) x0 + sqrt(1 - ab_k) eps on DiT's 1000 linear betas (sampling/ddpm.py), with k
uniform in {0, ..., 999}. The network outputs [eps | v] (model.learn_sigma) and takes k / 1000
as its time input, so a DiT with time_scale 1000 embeds the integer step k as DiT does.

  loss = mean(MSE(eps_pred, eps) + VB),

VB being KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) in bits per dimension, or the discretised
Gaussian decoder NLL at k = 0, with p's mean from stop_gradient(eps_pred) (`frozen_out`) so that
it trains the variance only; RESCALED_MSE is off.

`velocity` expresses the model in tesserax's flow convention (DESIGN.md) for the flow samplers.
The DDPM path is the flow path x_t = (1 - t) x0 + t eps rescaled: x_k = x_t / r with
r = sqrt((1 - t)^2 + t^2), at the step whose alpha_bar is (1 - t)^2 / r^2 (log-SNR
2 log((1 - t) / t)). Then x0 = (x_t - t eps) / (1 - t) and v = eps - x0.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tesserax.core import registry
from tesserax.objectives.context import Objective
from tesserax.objectives.rectified_flow import drop_labels
from tesserax.sampling import ddpm_sampler as diffusion

TABLES = diffusion.diffusion_tables(diffusion.linear_betas())
_AB = TABLES["alphas_cumprod"]
# Per step k: log-SNR (decreasing in k) and flow time t = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab)).
LOG_SNR = np.log(_AB) - np.log1p(-_AB)
FLOW_TIME = np.sqrt(1 - _AB) / (np.sqrt(_AB) + np.sqrt(1 - _AB))


def predict(apply, params, x, steps, labels):
  """The network output [eps | v] at DDPM steps `steps` ([B], integer-valued or not)."""
  return apply(params, x, steps / diffusion.NUM_TIMESTEPS, labels)


def epsilon_as_velocity(network, x, t):
  """The output [v | rest] at flow state x_t, time t [B] of an epsilon network
  `network(x_k, k / 1000) -> [eps | rest]` (DDPM step k as its time input; rest: the variance
  channels, a log-variance head), v = eps - x0 over its first C channels.

  The step is interpolated linearly in log-SNR between DDPM's steps and clamped to 0..999 (as
  k-diffusion's DiscreteSchedule.sigma_to_t); the scaling uses t itself below step 0's time
  t(0) ~ 0.0099, so the EDM denoiser of the result is exactly x_sigma - sigma eps(x_sigma /
  sqrt(1 + sigma^2), step(sigma)) there too. Above t(999) ~ 0.9937 t is clamped (x0 = (x_t - t
  eps) / (1 - t) has no value at pure noise; a DDPM chain, too, starts from step 999).
  """
  log_snr_t = jnp.clip(t, FLOW_TIME[0], FLOW_TIME[-1])
  log_snr = 2 * (jnp.log1p(-log_snr_t) - jnp.log(log_snr_t))
  steps = jnp.interp(log_snr, LOG_SNR[::-1], np.arange(diffusion.NUM_TIMESTEPS)[::-1])
  t = jnp.minimum(t, FLOW_TIME[-1]).reshape((-1,) + (1,) * (x.ndim - 1))
  r = jnp.sqrt(jnp.square(1 - t) + jnp.square(t))
  out = network(x / r, steps / diffusion.NUM_TIMESTEPS)
  eps = out[..., :x.shape[-1]]
  v = eps - (x - t * eps) / (1 - t)
  return jnp.concatenate([v.astype(out.dtype), out[..., x.shape[-1]:]], axis=-1)


def velocity(apply, params, x, t, labels):
  """v = eps - x0 at flow time t from the epsilon prediction (`epsilon_as_velocity`)."""
  network = lambda x_k, time: apply(params, x_k, time, labels)
  return epsilon_as_velocity(network, x, t)[..., :x.shape[-1]]


def normal_kl(mean1, log_var1, mean2, log_var2):
  """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise (diffusion/losses.py)."""
  return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                + jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def _approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(x) for x in [-1, 1] on 256 bins of width 2/255 under N(mean, e^(2 log_scale)), the
  edge bins open-ended, with the tanh approximation of the normal CDF (diffusion/losses.py)."""
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms(x0, x_k, steps, out):
  """DiT's _vb_terms_bpd per example ([B], bits per dimension) for model output `out`."""
  axes = tuple(range(1, x0.ndim))
  true_mean, true_log_var = diffusion.q_posterior(TABLES, x0, x_k, steps)
  mean, log_var, _ = diffusion.p_mean_variance(TABLES, out, x_k, steps)
  kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(axes) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(axes) / math.log(2.0)
  return jnp.where(steps == 0, nll, kl)


def loss(apply, params, batch, ctx, *, class_dropout):
  """MSE on epsilon plus the variational bound on the variance; returns (loss, metrics)."""
  x0, labels = batch["image"], batch["label"]
  key_k, key_eps, key_drop = jax.random.split(ctx.key, 3)
  steps = jax.random.randint(key_k, (x0.shape[0],), 0, diffusion.NUM_TIMESTEPS)
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
  x_k = (diffusion.gather(TABLES, "sqrt_alphas_cumprod", steps, x0.ndim) * x0
         + diffusion.gather(TABLES, "sqrt_one_minus_alphas_cumprod", steps, x0.ndim) * eps)
  labels = drop_labels(key_drop, labels, class_dropout, ctx.num_classes)
  out = predict(apply, params, x_k, steps, labels)
  channels = x0.shape[-1]
  eps_pred = out[..., :channels]
  mse = jnp.square(eps - eps_pred).mean(tuple(range(1, x0.ndim)))
  frozen = jnp.concatenate([jax.lax.stop_gradient(eps_pred), out[..., channels:]], axis=-1)
  vb = vb_terms(x0, x_k, steps, frozen)
  total = jnp.mean(mse + vb)
  return total, {"loss": total, "mse": jnp.mean(mse), "vb": jnp.mean(vb)}


@registry.OBJECTIVES.register("ddpm")
def make(config) -> Objective:
  """DiT's process has no settings; labels dropped with config.model.class_dropout. The
  network gives epsilon natively and a velocity for the flow samplers."""
  return Objective(loss=functools.partial(loss, class_dropout=config.model.class_dropout),
                   predictions={"epsilon": predict, "velocity": velocity})
