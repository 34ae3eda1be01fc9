"""Consistency models (objectives/edm.py, cd.py, consistency_training.py, ict.py, ect.py, scm.py,
ctm.py) and their samplers (sampling/consistency.py).

Oracles: Gaussian data x0 ~ N(mu, s^2 I), whose noisy marginals, posterior means and PF-ODE
are closed-form (VE: x_sigma ~ N(mu, (s^2 + sigma^2) I), the ODE is a scaling about mu), so
the exact consistency function f*(x, sigma) = mu + (x - mu) sqrt(s^2 + sigma_min^2) /
sqrt(s^2 + sigma^2), the exact denoiser and the exact rectified-flow velocity are known; central
finite differences for the sCM JVP; hand-computed schedule values from the papers' formulas.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tesserax.core.errors import TesseraxError
from tesserax.objectives import cd, consistency_training, ctm, ect, edm, ict, scm
from tesserax.sampling import consistency as consistency_sampling
from tesserax.sampling import sample as sample_lib

MU, S = 0.3, 0.7
SIGMA_MIN, SIGMA_DATA = 0.002, 0.5


def exact_velocity(x, t):
  """v*(x_t, t) = E[eps - x0 | x_t] of Gaussian data (flow time, t = 1 noise)."""
  t = t.reshape((-1,) + (1,) * (x.ndim - 1))
  c = (1 - t) ** 2 * S ** 2 + t ** 2
  r = x - (1 - t) * MU
  return t / c * r - (MU + (1 - t) * S ** 2 / c * r)


def exact_f(x, sigma):
  sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  return MU + (x - MU) * jnp.sqrt(S ** 2 + SIGMA_MIN ** 2) / jnp.sqrt(S ** 2 + sigma ** 2)


def exact_ode_step(x, sigma_from, sigma_to):
  ratio = jnp.sqrt(S ** 2 + sigma_to ** 2) / jnp.sqrt(S ** 2 + sigma_from ** 2)
  return MU + (x - MU) * ratio.reshape((-1,) + (1,) * (x.ndim - 1))


def smooth_velocity(key, channels, dtype=jnp.float32):
  """A fixed smooth nonlinear (x_t, t) -> v, standing in for a network."""
  w = jax.random.normal(key, (channels + 1, channels), dtype)
  return lambda x, t: jnp.tanh(
      jnp.concatenate([x, jnp.broadcast_to(t.reshape((-1,) + (1,) * (x.ndim - 1)),
                                           x.shape[:-1] + (1,))], -1) @ w)


def test_a_flow_model_converts_exactly_into_the_edm_denoiser_and_trigflow():
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(0)
    x = 2 * jax.random.normal(key, (64, 3), jnp.float64)
    sigma = jnp.exp(jax.random.uniform(jax.random.fold_in(key, 1), (64,), jnp.float64, -5, 4))
    denoised = edm.denoiser_from_velocity(exact_velocity)(x, sigma)
    posterior = MU + S ** 2 / (S ** 2 + sigma[:, None] ** 2) * (x - MU)
    np.testing.assert_allclose(denoised, posterior, rtol=1e-10, atol=1e-12)
    # TrigFlow: sigma_d F = E[dx_tau/dtau | x_tau] with x_tau = cos x0 + sin sigma_d eps.
    tau = jnp.arctan(sigma / SIGMA_DATA)[:, None]
    cos, sin = jnp.cos(tau), jnp.sin(tau)
    var = cos ** 2 * S ** 2 + sin ** 2 * SIGMA_DATA ** 2
    r = x - cos * MU
    mean_x0 = MU + cos * S ** 2 / var * r
    mean_noise = sin * SIGMA_DATA ** 2 / var * r  # E[sigma_d eps | x_tau]
    field = SIGMA_DATA * edm.trigflow_from_velocity(exact_velocity, SIGMA_DATA)(x, tau[:, 0])
    np.testing.assert_allclose(field, -sin * mean_x0 + cos * mean_noise, rtol=1e-10,
                               atol=1e-12)
    # The TrigFlow consistency function is the denoiser there.
    f = edm.trigflow_consistency(edm.trigflow_from_velocity(exact_velocity, SIGMA_DATA),
                                 SIGMA_DATA)(x, tau[:, 0])
    np.testing.assert_allclose(f, mean_x0, rtol=1e-10, atol=1e-12)


def test_the_boundary_condition_holds_exactly():
  v = smooth_velocity(jax.random.PRNGKey(1), 4)
  x = 3 * jax.random.normal(jax.random.PRNGKey(2), (16, 2, 2, 4))
  f = edm.consistency_function(edm.denoiser_from_velocity(v), SIGMA_MIN, SIGMA_DATA)
  np.testing.assert_array_equal(f(x, jnp.full(16, SIGMA_MIN)), x)
  assert np.abs(f(x, jnp.full(16, 1.0)) - x).max() > 0.1
  # A CTM jump from a level to itself is the identity.
  apply = lambda params, x, t, labels, train=False, s=None: v(x, t + 3 * s)
  g = ctm.jump(apply, None, None)
  sigma = jnp.linspace(0.01, 80.0, 16)
  np.testing.assert_allclose(g(x, sigma, sigma), x, rtol=1e-6, atol=1e-6)


def test_cd_with_the_exact_teacher_has_zero_loss_at_the_exact_consistency_function():
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(3)
    x0 = MU + S * jax.random.normal(key, (256, 4), jnp.float64)
    z = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float64)
    n = jax.random.randint(jax.random.fold_in(key, 2), (256,), 0, 17).astype(jnp.float64)
    sigma, sigma_next = (edm.karras_sigmas(i, 18, SIGMA_MIN, 80.0) for i in (n, n + 1))
    for metric in edm.METRICS:
      distance = lambda a, b: edm.distance(a - b, metric)
      exact = cd.distillation_distance(exact_f, exact_f, exact_ode_step, x0, z, sigma,
                                       sigma_next, distance)
      np.testing.assert_allclose(exact, 0.0, atol=1e-12)
      wrong = lambda x, s: exact_f(x, s) * 1.01
      perturbed = cd.distillation_distance(wrong, exact_f, exact_ode_step, x0, z, sigma,
                                           sigma_next, distance)
      assert perturbed.mean() > 1e-6
    # The teacher steps on the exact denoiser converge to the exact ODE step: local error
    # O(h^3) for Heun (ratio 8 per halving), O(h^2) for Euler (ratio 4).
    denoise = edm.denoiser_from_velocity(exact_velocity)
    ones = jnp.ones(256, jnp.float64)
    for step, ratio in ((edm.heun_step, 8), (edm.euler_step, 4)):
      error = [np.abs(step(denoise, x0, (1 + h) * ones, ones)
                      - exact_ode_step(x0, (1 + h) * ones, ones)).max() for h in (0.02, 0.01)]
      assert ratio * 0.9 < error[0] / error[1] < ratio * 1.1


def test_one_and_two_step_sampling_of_the_exact_function_reproduce_the_moments():
  noise = jax.random.normal(jax.random.PRNGKey(4), (20000, 2))
  labels = jnp.zeros(20000, jnp.int32)
  predict = lambda params, x, sigma, labels: exact_f(x, sigma)
  for sigmas in ((80.0,), (80.0, 0.821)):
    settings = ml_collections.ConfigDict(dict(solver="consistency", num_steps=len(sigmas),
                                              sigmas=sigmas, cfg_scale=1.0))
    sample = sample_lib.build(settings, {"denoiser": predict}, null_label=1)
    x = np.asarray(sample(None, noise, labels, jax.random.PRNGKey(5)))
    np.testing.assert_allclose(x.mean(0), MU, atol=0.02)
    np.testing.assert_allclose(x.std(0), S, rtol=0.02)


def test_samplers_refuse_models_of_another_kind_in_one_line():
  settings = ml_collections.ConfigDict(dict(solver="consistency", num_steps=1, sigmas=(80.0,),
                                            cfg_scale=1.0))
  with pytest.raises(TesseraxError, match="consistency needs denoiser; this model gives velocity"):
    sample_lib.build(settings, {"velocity": None}, null_label=1)
  settings.solver = "ctm"
  with pytest.raises(TesseraxError, match="ctm needs flow_map; this model gives denoiser"):
    sample_lib.build(settings, {"denoiser": None}, null_label=1)
  settings.update(solver="consistency", num_steps=3)
  with pytest.raises(TesseraxError, match="3 steps need that many sample.sigmas"):
    sample_lib.build(settings, {"denoiser": None}, null_label=1)


def test_ctm_gamma_sampling_of_an_exact_flow_map():
  """The exact flow map of Gaussian data, any gamma: the data's moments."""

  def flow_map(params, x, t, s, labels):
    to_sigma = lambda t: (t / (1 - t))[:, None]
    x_ve = exact_ode_step(x * (1 + to_sigma(t)), to_sigma(t)[:, 0], to_sigma(s)[:, 0])
    return x_ve / (1 + to_sigma(s))

  noise = jax.random.normal(jax.random.PRNGKey(6), (20000, 2))
  for gamma in (0.0, 0.5, 1.0):
    x = consistency_sampling.gamma_sample(flow_map, None, noise, None, jax.random.PRNGKey(7),
                                          [80.0, 2.0, 0.5], gamma)
    np.testing.assert_allclose(np.mean(x, 0), MU, atol=0.02)
    np.testing.assert_allclose(np.std(x, 0), S, rtol=0.02)


def test_scm_jvp_equals_a_central_difference_and_the_tangent_follows_its_formula():
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(8)
    trig_f = edm.trigflow_from_velocity(smooth_velocity(key, 3, jnp.float64), SIGMA_DATA)
    x = jax.random.normal(jax.random.fold_in(key, 1), (8, 3), jnp.float64)
    dxdt = jax.random.normal(jax.random.fold_in(key, 2), (8, 3), jnp.float64)
    tau = jnp.linspace(0.1, 1.5, 8)
    cs = (jnp.cos(tau) * jnp.sin(tau))[:, None]
    f_minus, g = scm.tangent(trig_f, x, tau, dxdt, 1.0, SIGMA_DATA)
    # g = cos(tau) d/dtau f(x(tau), tau) along dx/dtau, f = cos x - sin sigma_d F.
    f = edm.trigflow_consistency(trig_f, SIGMA_DATA)
    d = 1e-5
    total = (f(x + d * dxdt, tau + d) - f(x - d * dxdt, tau - d)) / (2 * d)
    np.testing.assert_allclose(g, jnp.cos(tau)[:, None] * total, rtol=1e-4, atol=1e-9)
    # The JVP itself against a central difference along (cos sin dx/dtau, cos sin).
    _, g_half = scm.tangent(trig_f, x, tau, dxdt, 0.5, SIGMA_DATA)
    jvp = (2 * (g - g_half) / -1.0 - cs * x) / SIGMA_DATA  # r enters g linearly
    fd = (trig_f(x + d * cs * dxdt, tau + d * cs[:, 0])
          - trig_f(x - d * cs * dxdt, tau - d * cs[:, 0])) / (2 * d)
    np.testing.assert_allclose(jvp, fd, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(f_minus, trig_f(x, tau), rtol=1e-12)
    # Warm-up r = min(1, k / H) and normalisation g / (||g|| + c).
    assert float(scm.warmup(2500, 10000)) == 0.25 and float(scm.warmup(20000, 10000)) == 1.0
    normed = scm.normalize(g, 0.1)
    norm = np.linalg.norm(np.asarray(g), axis=1)
    np.testing.assert_allclose(normed, np.asarray(g) / (norm + 0.1)[:, None], rtol=1e-12)


def test_schedules_match_hand_computed_values():
  # CT (s0 = 2, s1 = 150, mu0 = 0.9, K = 800k): scales(0) = ceil(2 - 1) = 1;
  # scales(400k) = ceil(sqrt(0.5 (151^2 - 4) + 4) - 1) = ceil(105.78) = 106; scales(K) = 150.
  k = jnp.array([0.0, 400000.0, 800000.0])
  np.testing.assert_array_equal(consistency_training.num_scales(k, 800000, 2, 150),
                                [2, 107, 151])
  np.testing.assert_allclose(consistency_training.ema_rate(k, 800000, 2, 150, 0.9),
                             [0.81, 0.9 ** (2 / 106), 0.9 ** (2 / 150)], rtol=1e-6)
  # iCT (s0 = 10, s1 = 1280, K = 400k): K' = floor(400k / (log2 128 + 1)) = 50000.
  k = jnp.array([0.0, 49999.0, 50000.0, 150000.0, 349999.0, 350000.0, 399999.0])
  np.testing.assert_array_equal(ict.num_scales(k, 400000, 10, 1280),
                                [11, 11, 21, 81, 641, 1281, 1281])
  # A run shorter than the curriculum's 8 stages doubles every step (K' = 1).
  np.testing.assert_array_equal(ict.num_scales(jnp.array([0.0, 1.0]), 4, 10, 1280), [11, 21])
  # ECT r(t), q = 2, k = 8, b = 1: stage 0 at t = 1 is clamped to 0; t = 10 at stage 0 and
  # t = 1 at stage 3 by hand from sigmoid(-10) = 4.5398e-5, sigmoid(-1) = 0.2689414.
  r = ect.nearer_sigma(jnp.array([1.0, 10.0, 1.0]), jnp.array([0.0, 0.0, 3.0]), 2.0, 8.0, 1.0)
  np.testing.assert_allclose(r, [0.0, 10 * (1 - 0.5 * (1 + 8 * 4.5398e-5)),
                                 1 - (1 + 8 * 0.2689414) / 16], rtol=1e-5)
  # iCT's proposal over a 4-point grid, from the erf formula.
  sigmas = jnp.array([0.002, 0.1, 2.0, 80.0, 200.0])
  p = jax.nn.softmax(ict.proposal_logits(sigmas, 4, -1.1, 2.0))
  cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in np.asarray(sigmas)]
  mass = np.diff(cdf)[:3]
  np.testing.assert_allclose(p, list(mass / mass.sum()) + [0.0], rtol=1e-5, atol=1e-12)


def test_the_scd_tangent_vanishes_at_the_exact_consistency_function():
  """Along the exact PF-ODE the exact consistency function is constant, so with the exact
  teacher g = cos(tau) df/dtau = 0 (r = 1); a perturbed F gets a nonzero tangent."""
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(9)
    x = jax.random.normal(key, (32, 3), jnp.float64)
    tau = jnp.linspace(0.05, 1.55, 32)

    def exact_trig_f(x, tau):  # F* = (cos x - f*) / (sin sigma_d), f* the ODE's end at tau = 0
      cos, sin = jnp.cos(tau)[:, None], jnp.sin(tau)[:, None]
      end = MU + (x - cos * MU) * S / jnp.sqrt(cos ** 2 * S ** 2 + sin ** 2 * SIGMA_DATA ** 2)
      return (cos * x - end) / (sin * SIGMA_DATA)

    dxdt = SIGMA_DATA * edm.trigflow_from_velocity(exact_velocity, SIGMA_DATA)(x, tau)
    _, g = scm.tangent(exact_trig_f, x, tau, dxdt, 1.0, SIGMA_DATA)
    np.testing.assert_allclose(g, 0.0, atol=1e-10)
    _, g = scm.tangent(lambda x, tau: 1.01 * exact_trig_f(x, tau), x, tau, dxdt, 1.0, SIGMA_DATA)
    assert np.abs(g).max() > 1e-3


def test_the_dit_log_variance_head_is_opt_in_and_leaves_the_prediction_unchanged():
  from flax import nnx

  from tesserax.generators import dit
  from tesserax.nn import layers
  config = dit.dit_config("S/4", input_size=8, in_channels=1, hidden_size=32, depth=1,
                          num_heads=2, num_classes=10, learn_sigma=False)
  plain = dit.DiT(config, rngs=nnx.Rngs(0))
  config.logvar_head = True
  with_head = dit.DiT(config, rngs=nnx.Rngs(0))
  kernel = jax.random.normal(jax.random.PRNGKey(10), with_head.logvar_linear.kernel.shape)
  with_head.logvar_linear.kernel[...] = kernel
  x = jax.random.normal(jax.random.PRNGKey(11), (3, 8, 8, 1))
  t, labels = jnp.array([0.1, 0.5, 0.9]), jnp.array([1, 2, 10])
  out = with_head(x, t, labels)
  np.testing.assert_array_equal(out[..., :1], plain(x, t, labels))
  expected = layers.timestep_embedding(t * config.time_scale) @ kernel
  np.testing.assert_allclose(out[..., 1], np.broadcast_to(expected[:, :, None], (3, 8, 8)),
                             rtol=1e-5, atol=1e-6)

