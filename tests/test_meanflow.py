"""MeanFlow (objectives/meanflow.py) and flow-map sampling (sampling/flow_map.py).

Oracles: with r = t the target is the velocity itself (flow matching); the JVP total derivative
against a central finite difference; Gaussian data N(0, s^2), whose flow is a scaling
z_r = z a(r) / a(t) with a(t) = sqrt((1 - t)^2 s^2 + t^2), so the exact average velocity is
u(z, r, t) = z (1 - a(r) / a(t)) / (t - r) and it is a fixed point of the MeanFlow target with
the exact velocity; the official batch layout (r = t and dropped labels on the first positions).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tesserax.core import config as config_lib
from tesserax.core.errors import TesseraxError
from tesserax.objectives import meanflow
from tesserax.training import loop

S = 0.7


def a(t):
  return jnp.sqrt((1 - t) ** 2 * S ** 2 + t ** 2)


def exact_u(z, t, r):
  """u(z, r, t) of Gaussian data, its r -> t limit v(z, t) where t = r."""
  tb, rb = t[:, None], r[:, None]
  v = z * (tb - (1 - tb) * S ** 2) / a(tb) ** 2
  gap = jnp.where(tb > rb, tb - rb, 1.0)
  return jnp.where(tb > rb, z * (1 - a(rb) / a(tb)) / gap, v)


def test_the_exact_average_velocity_is_the_fixed_point_of_the_target():
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(0)
    z = jax.random.normal(key, (64, 3), jnp.float64)
    t = jax.random.uniform(jax.random.fold_in(key, 1), (64,), jnp.float64, 0.2, 1.0)
    r = t * jax.random.uniform(jax.random.fold_in(key, 2), (64,), jnp.float64)
    v = exact_u(z, t, t)  # the exact (marginal) velocity at (z, t)
    u, u_tgt = meanflow.target(exact_u, z, t, r, v)
    np.testing.assert_allclose(u_tgt, u, rtol=1e-9, atol=1e-12)
    # One jump from noise maps N(0, 1) onto N(0, S^2) exactly.
    ones = jnp.ones(64, jnp.float64)
    np.testing.assert_allclose(z - exact_u(z, ones, 0 * ones), S * z, rtol=1e-12)
    # A wrong u is not a fixed point.
    wrong = lambda z, t, r: 1.1 * exact_u(z, t, r)
    u, u_tgt = meanflow.target(wrong, z, t, r, v)
    assert np.abs(u - u_tgt).max() > 1e-2


def test_jvp_total_derivative_equals_a_finite_difference():
  with jax.enable_x64(True):
    w = jax.random.normal(jax.random.PRNGKey(3), (3, 3), jnp.float64)
    u_fn = lambda z, t, r: jnp.tanh(z @ w * t[:, None] + (t - r)[:, None] ** 2) * (1 + r[:, None])
    z = jax.random.normal(jax.random.PRNGKey(4), (8, 3), jnp.float64)
    v = jax.random.normal(jax.random.PRNGKey(5), (8, 3), jnp.float64)
    t, r = jnp.linspace(0.3, 0.9, 8), jnp.linspace(0.1, 0.5, 8)
    _, u_tgt = meanflow.target(u_fn, z, t, r, v)
    du_dt = (v - u_tgt) / jnp.clip(t - r, 0, 1)[:, None]
    d = 1e-5
    fd = (u_fn(z + d * v, t + d, r) - u_fn(z - d * v, t - d, r)) / (2 * d)
    np.testing.assert_allclose(du_dt, fd, rtol=1e-4, atol=1e-8)


def test_with_r_equal_t_the_target_is_the_velocity():
  u_fn = lambda z, t, r: jnp.sin(3 * z) * t[:, None] + r[:, None]
  z, v = jnp.ones((4, 2)), jnp.arange(8.0).reshape(4, 2)
  t = jnp.array([0.1, 0.4, 0.7, 1.0])
  _, u_tgt = meanflow.target(u_fn, z, t, t, v)
  np.testing.assert_array_equal(u_tgt, v)


def test_the_official_batch_layout():
  settings = ml_collections.ConfigDict(dict(time_mean=-0.4, time_std=1.0, data_proportion=0.75))
  t, r = meanflow.sample_times(jax.random.PRNGKey(0), 4096, settings)
  assert np.all(r <= t) and np.all(np.asarray(r[:3072]) == np.asarray(t[:3072]))
  assert np.all(r[3072:] < t[3072:])
  logits = np.log(np.asarray(t) / (1 - np.asarray(t)))  # max of two N(-0.4, 1) draws
  assert abs(logits.mean() - (-0.4 + 1 / np.sqrt(np.pi))) < 0.05
  labels, dropped = meanflow.drop_first_labels(jax.random.PRNGKey(1), jnp.zeros(1000, jnp.int32),
                                               0.1, 10)
  n = int(dropped.sum())
  assert 60 < n < 140 and np.all(np.asarray(dropped[:n])) and not np.any(dropped[n:])
  assert np.all(np.asarray(labels[:n]) == 10) and np.all(np.asarray(labels[n:]) == 0)


def test_bad_input_is_refused_in_one_line(tiny_config):
  tiny_config.objective = config_lib.load("digits_meanflow:tiny").objective
  with pytest.raises(TesseraxError, match="second time input"):
    meanflow.make(tiny_config)


def test_digits_meanflow_trains_and_samples_in_jumps(digits_data_dir, tmp_path):
  """Two steps of the recipe through the unchanged loop; 1 and 2 jumps from the same noise
  give finite samples of the right shape; the flow-map sampler refuses a velocity model."""
  from tesserax.sampling import sample
  config = config_lib.load("digits_meanflow:tiny")
  config.data.data_dir = digits_data_dir
  config.num_steps = 2
  task, state = loop.train(config, str(tmp_path / "mf"), log=lambda *_: None)
  labels = np.arange(4, dtype=np.int32)
  settings = config.sample.copy_and_resolve_references()
  for jumps in (1, 2):
    settings.num_steps = jumps
    images = task.predict["generate"](state["ema"], labels, jax.random.PRNGKey(0), settings)
    assert images.shape == (4, 16, 16, 1) and np.all(np.isfinite(images))
  with pytest.raises(TesseraxError, match="^flow_map needs flow_map; this model gives velocity$"):
    sample.build(settings, {"velocity": None}, null_label=10)
