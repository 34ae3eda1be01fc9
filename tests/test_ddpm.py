"""DDPM (DiT's diffusion), its samplers and the guidance options, against analytic facts.

Oracles written here: DiT's linear schedule in float64, the exact epsilon of Gaussian and
point-mass data (E[eps | x_k] is linear in x_k), the exact flow velocity of a Gaussian, the
exact conditional velocity of a Gaussian mixture (written out here), closed-form KL and the
normal CDF.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate, special, stats

from tesserax.core.errors import TesseraxError
from tesserax.objectives import ddpm
from test_objective import loss_of
from tesserax.sampling import ddpm_sampler as sampling_ddpm
from tesserax.sampling import guidance
from test_sampling import gmm_velocity_np  # the exact Gaussian-mixture field

BETAS = np.linspace(1e-4, 0.02, 1000)  # DiT: 1000 linear betas
AB = np.cumprod(1 - BETAS)
MEAN, STD = 0.7, 0.5  # data: every pixel i.i.d. N(MEAN, STD^2) (STD = 0: a point mass)


# ---------------------------------------------------------------------------- schedule


def test_linear_schedule_and_respacing():
  np.testing.assert_allclose(sampling_ddpm.linear_betas(), BETAS, rtol=1e-15)
  steps = sampling_ddpm.space_timesteps(1000, 250)  # DiT's "250"
  assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
  assert steps[:6] == [0, 4, 8, 12, 16, 20] and set(np.diff(steps)) == {4, 5}
  # Sections: [10, 15, 20] of 300 steps -> 10 in [0, 100), 15 in [100, 200), 20 in [200, 300).
  sections = np.asarray(sampling_ddpm.space_timesteps(300, [10, 15, 20]))
  assert [np.sum((sections >= a) & (sections < a + 100)) for a in (0, 100, 200)] == [10, 15, 20]
  # Respaced betas keep alpha_bar on the kept steps: beta'_i = 1 - ab[s_i] / ab[s_{i-1}].
  betas = sampling_ddpm.respaced_betas(BETAS, steps)
  np.testing.assert_allclose(np.cumprod(1 - betas), AB[steps], rtol=1e-12)
  np.testing.assert_allclose(betas[1:], 1 - AB[steps][1:] / AB[steps][:-1], rtol=1e-12)
  np.testing.assert_allclose(sampling_ddpm.respaced_betas(BETAS, range(1000)), BETAS, rtol=1e-9)
  with pytest.raises(TesseraxError):
    sampling_ddpm.space_timesteps(100, 101)


# ---------------------------------------------------------------------------- samplers


def exact_eps_apply(std):
  """apply_fn of the exact [eps | v] for data N(MEAN, std^2) at base steps k:
  E[eps | x] = sqrt(1 - ab) (x - sqrt(ab) MEAN) / (ab std^2 + 1 - ab); v = -1 (posterior var)."""
  ab_table = jnp.asarray(AB, jnp.float32)

  def apply(params, x, steps, labels):
    del params, labels
    ab = ab_table[steps.astype(jnp.int32)].reshape((-1,) + (1,) * (x.ndim - 1))
    eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MEAN) / (ab * std ** 2 + 1 - ab)
    return jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)

  return apply


def _sample(method, num_steps, std, noise, key=jax.random.PRNGKey(0)):
  sampler = sampling_ddpm.make_ddpm_sampler(exact_eps_apply(std), method=method,
                                            num_steps=num_steps, null_label=10)
  return np.asarray(sampler(None, noise, jnp.zeros(noise.shape[0], jnp.int32), key))


def test_point_mass_is_reached_exactly():
  # With the exact epsilon of a point mass every x0 prediction is MEAN, so DDIM lands on it and
  # the ancestral chain's last (noise-free) step has mean exactly MEAN, up to float32 rounding
  # (amplified by sqrt(1 / ab) ~ 157 on a single jump from the last step).
  noise = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 3, 2))
  for method, steps, atol in (("ddim", 1, 1e-3), ("ddim", 25, 1e-5), ("ddpm", 25, 1e-5),
                              ("ddpm", 250, 1e-5)):
    np.testing.assert_allclose(_sample(method, steps, 0.0, noise), MEAN, atol=atol)


def test_ddim_with_the_exact_epsilon_converges_to_the_exact_transport():
  # The probability-flow map of N(MEAN, STD^2) from x_T (taken as the noise, as DiT's chain
  # does): x0 = MEAN + STD (x_T - sqrt(ab_T) MEAN) / sqrt(ab_T STD^2 + 1 - ab_T). DDIM is a
  # first-order solver of it: the error falls ~4x from 250 to 1000 steps.
  noise = jax.random.normal(jax.random.PRNGKey(2), (8, 4, 4, 1))
  exact = MEAN + STD * (np.asarray(noise) - np.sqrt(AB[-1]) * MEAN) / np.sqrt(
      AB[-1] * STD ** 2 + 1 - AB[-1])
  errors = {n: np.abs(_sample("ddim", n, STD, noise) - exact).max() for n in (250, 1000)}
  assert errors[1000] < 5e-3
  assert 3 < errors[250] / errors[1000] < 5


def test_ddpm_with_the_exact_epsilon_samples_the_data_distribution():
  # 16384 pixels: the sampling error of the std is ~0.6 %; 250 respaced steps with the
  # posterior variance under-disperse by ~2.5 %, the full 1000 by ~0.5 %.
  noise = jax.random.normal(jax.random.PRNGKey(3), (64, 16, 16, 1))
  for steps, tolerance in ((250, 0.04), (1000, 0.015)):
    x = _sample("ddpm", steps, STD, noise, jax.random.PRNGKey(4))
    assert abs(x.mean() - MEAN) < 0.01 and abs(x.std() / STD - 1) < tolerance
  with pytest.raises(TesseraxError, match="learn_sigma"):
    narrow = lambda p, x, s, y: exact_eps_apply(STD)(p, x, s, y)[..., :1]
    sampling_ddpm.make_ddpm_sampler(narrow, num_steps=4, null_label=10)(
        None, noise, jnp.zeros(64, jnp.int32), jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------- objective


def test_learned_range_variance_and_vb_terms():
  tables = sampling_ddpm.diffusion_tables(BETAS)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 2, 2, 3)).astype(np.float32)
  eps = rng.standard_normal(x0.shape).astype(np.float32)
  k = np.array([0, 1, 500, 999])
  x_k = (np.sqrt(AB[k])[:, None, None, None] * x0
         + np.sqrt(1 - AB[k])[:, None, None, None] * eps).astype(np.float32)
  post_var = BETAS * (1 - np.append(1.0, AB[:-1])) / (1 - AB)
  for v, log_var in ((-1.0, np.log(np.append(post_var[1], post_var[1:]))), (1.0, np.log(BETAS))):
    out = jnp.concatenate([eps, np.full_like(eps, v)], axis=-1)
    _, got, _ = sampling_ddpm.p_mean_variance(tables, out, x_k, k)
    np.testing.assert_allclose(got[:, 0, 0, 0], log_var[k], rtol=1e-5)
  # The true noise and the posterior variance: p = q, so the KL terms (k >= 1) vanish.
  out = jnp.concatenate([eps, -np.ones_like(eps)], axis=-1)
  vb = np.asarray(ddpm.vb_terms(x0, x_k, k, out))
  np.testing.assert_allclose(vb[1:], 0.0, atol=1e-4)
  # k = 0: the decoder NLL in bits of bins of width 2/255 around x0 with the exact mean.
  sigma = np.exp(0.5 * np.log(post_var[1]))
  cdf = lambda z: special.ndtr(z / sigma)
  bins = np.where(x0[0] > 0.999, 1 - cdf(-1 / 255), np.where(
      x0[0] < -0.999, cdf(1 / 255), cdf(1 / 255) - cdf(-1 / 255)))
  assert abs(vb[0] - np.mean(-np.log(bins)) / np.log(2)) < 0.01 * vb[0]
  # KL against numerical integration.
  m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(1.7)
  p, q = stats.norm(m1, np.exp(lv1 / 2)), stats.norm(m2, np.exp(lv2 / 2))
  kl = integrate.quad(lambda z: p.pdf(z) * (p.logpdf(z) - q.logpdf(z)), -20, 20)[0]
  assert abs(float(ddpm.normal_kl(m1, lv1, m2, lv2)) - kl) < 1e-6


def _gaussian_model(theta):
  """A 'network' that predicts eps = theta[0] x and v = theta[1] everywhere ([eps | v])."""
  def model(x, t, labels):
    return jnp.concatenate([theta[0] * x, jnp.full_like(x, theta[1])], axis=-1)
  return model


def test_loss_is_mse_plus_vb_with_vb_on_the_variance_only():
  batch = {"image": STD * jax.random.normal(jax.random.PRNGKey(5), (16, 4, 4, 2)),
           "label": jnp.zeros(16, jnp.int32)}
  config = ml_collections.ConfigDict({"name": "ddpm"})
  run = jax.jit(lambda theta: loss_of(_gaussian_model(theta), batch, jax.random.PRNGKey(6),
                                      config, class_dropout=0.1))
  theta = jnp.array([0.5, 0.2])
  total, metrics = run(theta)
  np.testing.assert_allclose(total, metrics["mse"] + metrics["vb"], rtol=1e-6)
  grad_total = jax.grad(lambda th: run(th)[0])(theta)
  grad_mse = jax.grad(lambda th: run(th)[1]["mse"])(theta)
  np.testing.assert_allclose(grad_total[0], grad_mse[0], rtol=1e-6)  # none from VB
  assert grad_mse[1] == 0 and grad_total[1] != 0  # the variance head only from VB


def test_mse_of_the_exact_epsilon_is_the_irreducible_error():
  # For x0 ~ N(0, STD^2): Var(eps | x_k) = ab STD^2 / (ab STD^2 + 1 - ab), averaged over k.
  def exact(x, t, labels):
    ab = jnp.asarray(AB, jnp.float32)[jnp.round(t * 1000).astype(jnp.int32)][:, None, None, None]
    eps = jnp.sqrt(1 - ab) * x / (ab * STD ** 2 + 1 - ab)
    return jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)

  batch = {"image": STD * jax.random.normal(jax.random.PRNGKey(7), (4096, 2, 2, 1)),
           "label": jnp.zeros(4096, jnp.int32)}
  _, metrics = loss_of(exact, batch, jax.random.PRNGKey(8),
                       ml_collections.ConfigDict({"name": "ddpm"}))
  expected = np.mean(AB * STD ** 2 / (AB * STD ** 2 + 1 - AB))
  assert abs(float(metrics["mse"]) / expected - 1) < 0.05


def test_velocity_in_flow_time_is_the_exact_flow_velocity():
  """ddpm.velocity of the exact DDPM epsilon is the exact rectified-flow velocity of the same
  data (v = E[eps | x_t] - E[x0 | x_t]) at the flow times of DDPM's steps."""
  k = np.array([0, 10, 300, 700, 999])
  t = np.sqrt(1 - AB[k]) / (np.sqrt(AB[k]) + np.sqrt(1 - AB[k]))
  x = np.random.default_rng(1).standard_normal((5, 3, 3, 2)).astype(np.float32)

  def model(x, tau, labels):  # the network input is k / 1000
    return exact_eps_apply(STD)(None, x, jnp.round(tau * 1000), labels)

  apply = lambda params, x, t, labels: model(x, t, labels)
  ours = ddpm.velocity(apply, None, jnp.asarray(x), jnp.asarray(t, jnp.float32), None)
  tb = t[:, None, None, None]
  c = (1 - tb) ** 2 * STD ** 2 + tb ** 2
  d = x - (1 - tb) * MEAN
  exact = tb / c * d - (MEAN + (1 - tb) * STD ** 2 / c * d)
  np.testing.assert_allclose(ours, exact, rtol=1e-3, atol=1e-3 * np.abs(exact).max())
  edges = ddpm.velocity(apply, None, jnp.asarray(x[:2]), jnp.array([0.0, 1.0]), None)
  assert np.all(np.isfinite(edges))  # clamped to DDPM's range


# ---------------------------------------------------------------------------- rectified flow


def test_cosine_loss():
  """Point-mass data x0 = MEAN: the exact velocity is (x_t - MEAN) / t. The cosine term is 0
  for it and for any positive multiple, 2 for its negation."""
  batch = {"image": jnp.full((64, 2, 2, 3), MEAN), "label": jnp.zeros(64, jnp.int32)}
  config = ml_collections.ConfigDict(dict(name="rectified_flow", time_sampling="uniform",
                                          logit_mean=0.0, logit_std=1.0, cosine_loss=True))
  for scale, mse, cosine in ((1.0, 0.0, 0.0), (2.0, None, 0.0), (-1.0, None, 2.0)):
    model = lambda x, t, y: scale * (x - MEAN) / t[:, None, None, None]
    _, m = loss_of(model, batch, jax.random.PRNGKey(0), config)
    assert abs(float(m["cosine"]) - cosine) < 1e-4
    assert mse is None or float(m["mse"]) < 1e-4
    assert float(m["loss"]) == pytest.approx(float(m["mse"]) + float(m["cosine"]), rel=1e-6)
  # The zero-initialised output (adaLN-Zero) must give finite gradients.
  grad = jax.grad(lambda s: loss_of(
      lambda x, t, y: s * jnp.zeros_like(x), batch, jax.random.PRNGKey(0), config)[0])(1.0)
  assert np.isfinite(grad)


# ---------------------------------------------------------------------------- guidance

# Two classes in 4 dimensions (channels): isotropic Gaussians; NULL is the mixture.
WEIGHTS, STDS = np.array([0.3, 0.7]), np.array([0.4, 0.9])
MEANS = np.array([[-1.5, 0.5, 1.0, -0.5], [1.0, -1.0, 0.0, 2.0]])
NULL = 2


MIXTURE = dict(weights=WEIGHTS, means=MEANS, stds=STDS)


def gmm_model(x, t_vec, labels):
  """The same field in JAX, per example: class k's, or the mixture's for NULL."""
  t = t_vec[:, None]
  means, stds = jnp.asarray(MEANS, jnp.float32), jnp.asarray(STDS, jnp.float32)
  c = (1 - t) ** 2 * stds ** 2 + t ** 2
  diff = x[:, None, :] - (1 - t)[..., None] * means
  log_w = jnp.log(jnp.asarray(WEIGHTS, jnp.float32)) - 0.5 * jnp.sum(diff ** 2, -1) / c \
      - 2 * jnp.log(c)
  post = jnp.where((labels == NULL)[:, None], jax.nn.softmax(log_w, 1), jax.nn.one_hot(labels, 2))
  x0 = means + ((1 - t) * stds ** 2 / c)[..., None] * diff
  eps = (t / c)[..., None] * diff
  return jnp.sum(post[..., None] * (eps - x0), axis=1)


X = np.random.RandomState(0).randn(6, 4).astype(np.float32) * 1.5
LABELS = np.array([0, 1, 1, 0, 1, 0], np.int32)


def _fields(t):
  v_c = np.stack([gmm_velocity_np(X[i:i + 1], t, [y], MIXTURE)[0]
                  for i, y in enumerate(LABELS)])
  return v_c, gmm_velocity_np(X, t, [0, 1], MIXTURE)


def test_guidance_on_the_exact_mixture_field():
  labels = jnp.asarray(LABELS)
  # LightningDiT 800ep: guidance off while t_theirs < 0.125, i.e. on for t <= 0.875 here.
  interval = (0.0, 0.875)
  for channels in (None, 3):
    scale_one = jax.jit(guidance.guided_velocity(gmm_model, labels, NULL, 1.0, interval,
                                                 channels))
    guided = jax.jit(guidance.guided_velocity(gmm_model, labels, NULL, 4.0, interval, channels))
    conditional = jax.jit(lambda x, t: gmm_model(x, jnp.full((6,), t), labels))
    for t in (0.2, 0.6, 0.95):
      v_c, v_u = _fields(t)
      t32 = jnp.float32(t)
      np.testing.assert_allclose(scale_one(X, t32), v_c, rtol=1e-5, atol=1e-5)  # scale 1
      if t > 0.875:  # outside the interval: exactly the conditional velocity
        np.testing.assert_array_equal(guided(X, t32), conditional(X, t32))
        continue
      expected = v_u + 4.0 * (v_c - v_u)
      if channels is not None:  # the official quirk: the rest stays conditional
        expected[:, channels:] = v_c[:, channels:]
        np.testing.assert_allclose(guided(X, t32)[:, 3:], conditional(X, t32)[:, 3:],
                                   rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(guided(X, t32), expected, rtol=1e-4, atol=1e-4)
