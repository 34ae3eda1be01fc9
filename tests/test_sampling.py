"""Tests of sampling/: time grids, solvers on exact Gaussian fields, guidance, the sampler.

The oracles are the exact velocity fields of Gaussians and Gaussian mixtures, written out here,
and a table of exact sampler errors on the exact field of Gaussian data (computed analytically).
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tesserax.core import host
from tesserax.core.errors import TesseraxError
from tesserax.sampling import guidance, sample, solvers, timesteps

# Exact errors on the exact rectified-flow field, W2 = |std_out - s| for data N(0, s^2):
# steps -> value.
TABLE = {
    ("euler", True, 1.0): {1: 1.000, 2: 0.500, 4: 0.280, 8: 0.149, 16: 0.0773, 32: 0.0394},
    ("heun", False, 1.0): {1: 1.000, 2: 0.250, 4: 0.0496, 8: 0.0101, 16: 0.0022, 32: 0.0005},
    ("heun", True, 1.0): {1: 0.500, 2: 0.0625, 4: 0.0100, 8: 0.0013, 16: 0.0002, 32: 0.0000},
    ("euler", True, 2.0): {1: 2.000, 2: 1.200, 4: 0.638, 8: 0.341, 16: 0.177, 32: 0.0905},
    ("heun", True, 2.0): {1: 1.500, 2: 0.470, 4: 0.0903, 8: 0.0191, 16: 0.0042, 32: 0.0010},
}


def gaussian_field(s):
  """Exact 1-RF velocity for data N(0, s^2): v = E[eps|x] - E[x0|x] with C = (1-t)^2 s^2 + t^2."""
  def velocity(x, t):
    c = (1 - t) ** 2 * s ** 2 + t ** 2
    return (t * x - (1 - t) * s ** 2 * x) / c
  return velocity


def run_solver(solver, final_correction, velocity, noise, times):
  if solver == "euler":
    return solvers.euler(velocity, noise, times)
  return solvers.heun(velocity, noise, times, final_correction=final_correction)


# ---------------------------------------------------------------------------- time grids


def test_shift_time_formula_endpoints_and_monotone():
  t = np.linspace(0.0, 1.0, 101)
  for s in (0.3, 1.0, 3.0):
    shifted = np.asarray(timesteps.shift_time(t, s))
    np.testing.assert_allclose(shifted, s * t / (1 + (s - 1) * t), rtol=1e-6, atol=1e-7)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert np.all(np.diff(shifted) > 0)
  assert float(timesteps.shift_time(0.5, 3.0)) == pytest.approx(0.75)  # SD3-medium's s = 3
  assert np.all(np.asarray(timesteps.shift_time(t[1:-1], 3.0)) > t[1:-1])  # towards noise


def test_lightningdit_shift_is_reciprocal_in_our_convention():
  u = np.linspace(0.0, 1.0, 11)  # LightningDiT time, u = 0 is noise
  theirs = 0.3 * u / (1 + (0.3 - 1) * u)
  ours = np.asarray(timesteps.shift_time(1.0 - u, 1 / 0.3))
  np.testing.assert_allclose(ours, 1.0 - theirs, atol=1e-6)


def test_time_grid():
  grid = np.asarray(timesteps.time_grid(8))
  np.testing.assert_allclose(grid, np.linspace(1.0, 0.0, 9), atol=1e-7)
  shifted = np.asarray(timesteps.time_grid(8, shift=3.0))
  assert shifted.shape == (9,) and shifted[0] == 1.0 and shifted[-1] == 0.0
  assert np.all(np.diff(shifted) < 0)
  with pytest.raises(TesseraxError):
    timesteps.time_grid(0)
  with pytest.raises(TesseraxError):
    timesteps.shift_time(0.5, 0.0)


# ---------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("solver,final_correction,s", list(TABLE))
def test_exact_gaussian_errors_match_table(solver, final_correction, s):
  # The field is linear in x, so integrating x = 1 gives std_out = |x0| exactly.
  run = jax.jit(lambda times: run_solver(solver, final_correction, gaussian_field(s),
                                         jnp.ones(1), times))
  for steps, expected in TABLE[(solver, final_correction, s)].items():
    if expected == 0.0:
      continue
    w2 = abs(abs(float(run(timesteps.time_grid(steps))[0])) - s)
    # 5%, or half a unit of the table's fourth decimal for the tiny entries.
    assert w2 == pytest.approx(expected, rel=0.05, abs=5e-5), (steps, w2, expected)


def test_one_euler_step_collapses_to_the_mean():
  weights, means, stds = np.array([0.3, 0.7]), np.array([-1.0, 3.0]), np.array([0.5, 1.0])

  def velocity(x, t):  # exact 1-D GMM field
    m = (1 - t) * means
    c = (1 - t) ** 2 * stds ** 2 + t ** 2
    log_w = jnp.log(weights) - 0.5 * (x[:, None] - m) ** 2 / c - 0.5 * jnp.log(c)
    w = jax.nn.softmax(log_w, axis=1)
    x0 = means + (1 - t) * stds ** 2 / c * (x[:, None] - m)
    eps = t / c * (x[:, None] - m)
    return jnp.sum(w * (eps - x0), axis=1)

  noise = jax.random.normal(jax.random.key(0), (1000,))
  out = np.asarray(solvers.euler(velocity, noise, timesteps.time_grid(1)))
  np.testing.assert_allclose(out, np.sum(weights * means), atol=1e-5)


@pytest.mark.parametrize("solver,final_correction", [("euler", True), ("heun", True),
                                                      ("heun", False)])
def test_nfe_counts_evaluations(solver, final_correction):
  calls = []

  def velocity(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return -x

  for steps in (1, 3):
    calls.clear()
    out = run_solver(solver, final_correction, velocity, jnp.ones(2), timesteps.time_grid(steps))
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(calls) == solvers.nfe(solver, steps, final_correction)
  assert solvers.nfe("heun", 18, final_correction=False) == 35  # EDM's CIFAR-10 setting
  with pytest.raises(TesseraxError):
    solvers.nfe("dopri5", 4)
  with pytest.raises(TesseraxError):
    solvers.euler(velocity, jnp.ones(2), jnp.ones(1))


# ---------------------------------------------------------------------------- guidance

GMM = dict(weights=np.array([0.4, 0.6]), means=np.array([[-2.0, 1.0], [1.5, -0.5]]),
           stds=np.array([0.5, 0.8]))
NULL = 2


def gmm_velocity_np(x, t, components, mixture=GMM):
  """The exact GMM velocity in float64 NumPy for isotropic components: the field of `mixture`
  restricted to `components` (one index: that class's Gaussian; all: the unconditional mixture)."""
  x = np.asarray(x, np.float64)
  w, mu, sd = (mixture[k][components] for k in ("weights", "means", "stds"))
  m = (1 - t) * mu  # [K, D]
  c = (1 - t) ** 2 * sd ** 2 + t ** 2  # [K]
  diff = x[:, None, :] - m  # [B, K, D]
  log_w = np.log(w) - 0.5 * np.sum(diff ** 2, -1) / c - 0.5 * x.shape[1] * np.log(c)
  post = np.exp(log_w - log_w.max(1, keepdims=True))
  post /= post.sum(1, keepdims=True)
  x0 = mu + ((1 - t) * sd ** 2 / c)[:, None] * diff
  eps = (t / c)[:, None] * diff
  return np.sum(post[..., None] * (eps - x0), axis=1)


def gmm_model(calls):
  """model_fn(x, t_vec, labels) in JAX: label k < 2 gives class k's field, NULL the mixture's.
  Records the batch size of every traced call."""
  weights, means, stds = (jnp.asarray(GMM[k], jnp.float32) for k in ("weights", "means", "stds"))

  def model_fn(x, t_vec, labels):
    calls.append(x.shape[0])
    assert t_vec.shape == labels.shape == x.shape[:1]
    t = t_vec[:, None]
    m = (1 - t)[..., None] * means  # [B, K, D]
    c = (1 - t) ** 2 * stds ** 2 + t ** 2  # [B, K]
    diff = x[:, None, :] - m
    log_w = jnp.log(weights) - 0.5 * jnp.sum(diff ** 2, -1) / c - jnp.log(c)
    post = jnp.where((labels == NULL)[:, None], jax.nn.softmax(log_w, axis=1),
                     jax.nn.one_hot(labels, 2))
    x0 = means + ((1 - t) * stds ** 2 / c)[..., None] * diff
    eps = (t / c)[..., None] * diff
    return jnp.sum(post[..., None] * (eps - x0), axis=1)

  return model_fn


X = np.random.RandomState(0).randn(6, 2).astype(np.float32) * 1.5
LABELS = np.array([0, 1, 0, 1, 1, 0], np.int32)


def expected_fields(t):
  v_u = gmm_velocity_np(X, t, [0, 1])
  v_c = np.stack([gmm_velocity_np(X[i:i + 1], t, [y])[0] for i, y in enumerate(LABELS)])
  return v_c, v_u


def test_model_matches_numpy_oracle():
  model_fn = gmm_model([])
  for t in (0.2, 0.9):
    v_c, v_u = expected_fields(t)
    t_vec = jnp.full((6,), t)
    np.testing.assert_allclose(model_fn(X, t_vec, LABELS), v_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model_fn(X, t_vec, jnp.full((6,), NULL)), v_u, rtol=1e-5,
                               atol=1e-5)


def test_cfg_scale_one_is_the_conditional_field_with_one_pass():
  calls = []
  model_fn = gmm_model(calls)
  velocity = jax.jit(guidance.guided_velocity(model_fn, jnp.asarray(LABELS), NULL, 1.0))
  direct = jax.jit(lambda x, t: model_fn(x, jnp.full((6,), t), LABELS))
  for t in (0.0, 0.5, 1.0):
    v = np.asarray(velocity(X, jnp.float32(t)))
    np.testing.assert_array_equal(v, direct(X, jnp.float32(t)))
    np.testing.assert_allclose(v, expected_fields(t)[0], rtol=1e-5, atol=1e-5)
  assert set(calls) == {6}  # never a doubled (unconditional) batch


def test_guidance_interval():
  calls = []
  w, interval = 3.0, (0.3, 0.7)
  labels = jnp.asarray(LABELS)
  velocity = jax.jit(guidance.guided_velocity(gmm_model(calls), labels, NULL, w, interval))
  conditional = jax.jit(guidance.guided_velocity(gmm_model([]), labels, NULL, 1.0))
  for t in (0.0, 0.1, 0.3, 0.8, 1.0):  # outside (0.3, 0.7]: exactly the conditional velocity
    np.testing.assert_array_equal(velocity(X, jnp.float32(t)), conditional(X, jnp.float32(t)))
  for t in (0.31, 0.5, 0.7):  # inside, 0.7 included
    v_c, v_u = expected_fields(t)
    np.testing.assert_allclose(velocity(X, jnp.float32(t)), v_u + w * (v_c - v_u),
                               rtol=1e-5, atol=1e-4)
  # The guided branch is one model call on 2B; the other branch one call on B.
  assert sorted(calls) == [6, 12]
  with pytest.raises(TesseraxError):
    guidance.guided_velocity(gmm_model([]), labels, NULL, 2.0, (0.7, 0.3))


# ---------------------------------------------------------------------------- sampler

SAMPLER_MEANS = np.array([-1.0, 2.0], np.float32)  # class y: pixels i.i.d. N(mean_y, SCALE^2)
SCALE = 0.5


def class_gaussian_apply(params, x, t_vec, labels):
  """Exact velocity for class-conditional data N(mean_y, scale^2) per pixel; the null label
  gets the field of N(0, scale^2)."""
  mean = jnp.concatenate([params["means"], jnp.zeros(1)])[labels]
  mean = mean.reshape((-1,) + (1,) * (x.ndim - 1))
  t = t_vec.reshape(mean.shape)
  s2 = params["scale"] ** 2
  c = (1 - t) ** 2 * s2 + t ** 2
  d = x - (1 - t) * mean
  return t / c * d - (mean + (1 - t) * s2 / c * d)


def test_sampler_reaches_exact_transport():
  # For Gaussian data the exact noise -> data map is x0 = mean_y + scale * z.
  params = {"means": jnp.asarray(SAMPLER_MEANS), "scale": jnp.float32(SCALE)}
  noise = jax.random.normal(jax.random.key(1), (4, 3, 3, 1))
  labels = jnp.array([0, 1, 1, 0], jnp.int32)
  exact = SAMPLER_MEANS[np.asarray(labels)][:, None, None, None] + SCALE * np.asarray(noise)
  for shift in (1.0, 3.0):
    run = sample.make_sampler(class_gaussian_apply, solver="heun", num_steps=64, shift=shift,
                              null_label=2)
    np.testing.assert_allclose(run(params, noise, labels), exact, atol=2e-4)
  # The fields are affine in the mean and the null class has mean 0, so guiding with w is
  # exactly the field of mean w * mean_y (EDM-Heun never evaluates t = 0, outside (0, 1]).
  run = sample.make_sampler(class_gaussian_apply, solver="heun", num_steps=64, cfg_scale=2.5,
                            null_label=2, final_correction=False)
  np.testing.assert_allclose(run(params, noise, labels), exact + 1.5 * (exact - SCALE * noise),
                             atol=1e-3)  # EDM-Heun's last Euler step: ~4e-4 here


def test_sampler_compiles_once_and_checks_input():
  traces = []

  def apply_fn(params, x, t_vec, labels):
    traces.append(x.shape)
    return class_gaussian_apply(params, x, t_vec, labels)

  params = {"means": jnp.asarray(SAMPLER_MEANS), "scale": jnp.float32(SCALE)}
  run = sample.make_sampler(apply_fn, solver="euler", num_steps=4, cfg_scale=2.0,
                            interval=(0.2, 0.8), null_label=2)
  labels = jnp.array([0, 1], jnp.int32)
  for seed in range(3):
    run(params, jax.random.normal(jax.random.key(seed), (2, 4)), labels)
  assert sorted(traces) == [(2, 4), (4, 4)]  # one trace: conditional and guided branches
  with pytest.raises(TesseraxError):
    run(params, jnp.zeros((3, 4)), labels)
  with pytest.raises(TesseraxError):
    sample.make_sampler(apply_fn, solver="rk4", num_steps=4, null_label=2)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from tesserax.core.errors import TesseraxError
    from tesserax.sampling.sample import make_sampler
    from test_sampling import class_gaussian_apply, SAMPLER_MEANS, SCALE
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    params = {"means": jnp.asarray(SAMPLER_MEANS), "scale": jnp.float32(SCALE)}
    noise = jax.random.normal(jax.random.key(0), (16, 4, 4, 1))
    labels = jnp.arange(16, dtype=jnp.int32) % 2
    settings = dict(solver="heun", num_steps=6, shift=2.0, cfg_scale=2.5, interval=(0.1, 0.8),
                    null_label=2, final_correction=False)
    single = make_sampler(class_gaussian_apply, **settings)(params, noise, labels)
    sharded = make_sampler(class_gaussian_apply, mesh=mesh, **settings)(params, noise, labels)
    assert sharded.sharding.spec == P(("data", "fsdp")), sharded.sharding
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
    try:
      make_sampler(class_gaussian_apply, mesh=mesh, **settings)(params, noise[:6], labels[:6])
      raise AssertionError("indivisible batch accepted")
    except TesseraxError:
      pass
    print("OK")
""")


def test_sampler_on_8_devices_matches_1_device():
  env = dict(host.xla_flags_env(os.environ, "--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
