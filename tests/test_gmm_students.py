"""Few-step students trained on a 2-D Gaussian mixture: 8 Gaussians of std 0.1 on a ring of
radius 2, the CPU experiment of consistency distillation (objectives/cd.py) and MeanFlow
(objectives/meanflow.py), sampled by sampling/consistency.py and sampling/flow_map.py.

Oracles: the mixture's exact rectified-flow velocity, written here from its closed form
(x_t | k ~ N((1 - t) mu_k, ((1 - t)^2 s^2 + t^2) I), posterior-weighted over the modes), is the
CD teacher and, solved with 50 Heun steps (100 NFE), the multi-step reference. The metrics are
mode precision (the fraction of samples within 3 std of a mode; 1 - e^-4.5 = 0.989 for the
data itself) and the share of samples nearest each mode (1/8 each for the data: no mode
dropped). The students are a small MLP over random Fourier features of x and sinusoidal
features of the times, trained under jit with lax.scan.
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tesserax.objectives import cd, meanflow
from tesserax.objectives.context import Context
from tesserax.sampling import consistency as consistency_sampling
from tesserax.sampling import flow_map as flow_map_lib
from tesserax.sampling import sample as sample_lib
from tesserax.sampling import solvers, timesteps

RADIUS, STD, MODES = 2.0, 0.1, 8
MEANS = np.array([[RADIUS * math.cos(2 * math.pi * k / MODES),
                   RADIUS * math.sin(2 * math.pi * k / MODES)] for k in range(MODES)],
                 np.float32)
WIDTH, X_FEATURES = 128, 64
TIME_FREQUENCIES = math.pi * 2.0 ** np.arange(8, dtype=np.float32)
NUM_SAMPLES = 10000


def sample_data(key, n):
  key_k, key_x = jax.random.split(key)
  k = jax.random.randint(key_k, (n,), 0, MODES)
  return jnp.asarray(MEANS)[k] + STD * jax.random.normal(key_x, (n, 2))


def exact_velocity(x, t):
  """v*(x_t, t) = sum_k w_k(x) (E[eps | x, k] - E[x0 | x, k]) of the mixture."""
  t = jnp.reshape(t, (-1, 1, 1))
  var = (1 - t) ** 2 * STD ** 2 + t ** 2
  offset = x[:, None, :] - (1 - t) * MEANS[None]
  weights = jax.nn.softmax(-jnp.sum(offset ** 2, -1, keepdims=True) / (2 * var), axis=1)
  noise = t / var * offset
  data = MEANS[None] + (1 - t) * STD ** 2 / var * offset
  return jnp.sum(weights * (noise - data), axis=1)


def mode_precision(x):
  distance = np.linalg.norm(np.asarray(x)[:, None] - MEANS[None], axis=-1)
  return float(np.mean(distance.min(1) < 3 * STD))


def mode_shares(x):
  distance = np.linalg.norm(np.asarray(x)[:, None] - MEANS[None], axis=-1)
  return np.bincount(distance.argmin(1), minlength=MODES) / len(x)


# The student network: apply(params, x, t, labels, *, train, s) -> [B, 2] (objectives/context.py).

FOURIER = np.asarray(jax.random.normal(jax.random.PRNGKey(42), (2, X_FEATURES)))


def time_features(t):
  t = jnp.reshape(t, (-1, 1))
  return [t, jnp.sin(t * TIME_FREQUENCIES), jnp.cos(t * TIME_FREQUENCIES)]


def init_mlp(key, second_time=False):
  times = (2 if second_time else 1) * (1 + 2 * len(TIME_FREQUENCIES))
  sizes = [2 + 2 * X_FEATURES + times, WIDTH, WIDTH, WIDTH, 2]
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (m, n)) / math.sqrt(m), "b": jnp.zeros(n)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params, x, t, labels, *, train=False, s=None):
  del labels, train
  h = [x, jnp.sin(x @ FOURIER), jnp.cos(x @ FOURIER)] + time_features(t)
  h = jnp.concatenate(h + (time_features(s) if s is not None else []), -1)
  for layer in params[:-1]:
    h = jax.nn.silu(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


def train(loss, params, steps, *, lr, batch_size=256, teacher=None, ema_decay=0.995, seed=0):
  """The EMA parameters after `steps` Adam steps (cosine decay) of `loss(apply, params, batch,
  ctx)` on fresh mixture samples; the context carries the EMA and the teacher."""
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))

  def step(carry, i):
    params, opt_state, ema = carry
    key_data, key_loss = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i))
    batch = {"image": sample_data(key_data, batch_size),
             "label": jnp.zeros(batch_size, jnp.int32)}
    ctx = Context(step=i, key=key_loss, num_classes=1, ema=ema, teacher=teacher)
    grads = jax.grad(lambda p: loss(mlp, p, batch, ctx)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    return (params, opt_state, ema), None

  run = jax.jit(lambda params: jax.lax.scan(step, (params, tx.init(params), params),
                                            jnp.arange(steps))[0][2])
  return jax.block_until_ready(run(params))


@pytest.fixture(scope="session")
def noise():
  return jax.random.normal(jax.random.PRNGKey(7), (NUM_SAMPLES, 2))


@pytest.fixture(scope="session")
def ode_reference(noise):
  """50 Heun steps (100 NFE) of the exact field."""
  return np.asarray(jax.jit(lambda z: solvers.heun(exact_velocity, z,
                                                   timesteps.time_grid(50)))(noise))


CD_SETTINGS = ml_collections.ConfigDict(cd.defaults(sigma_max=20.0, sigma_data=1.0))


@pytest.fixture(scope="session")
def cd_student():
  """CD with the exact teacher (Heun on the 18-point Karras grid, sigma_max scaled to the data,
  l2, online target)."""
  loss = functools.partial(cd.loss, settings=CD_SETTINGS)
  teacher = (lambda params, x, t, labels: exact_velocity(x, t), None)
  return train(loss, init_mlp(jax.random.PRNGKey(0)), 4000, lr=2e-3, teacher=teacher)


def test_the_reference_ode_matches_the_mixture(ode_reference):
  assert mode_precision(ode_reference) > 0.98
  np.testing.assert_allclose(mode_shares(ode_reference), 1 / MODES, atol=0.015)


def test_consistency_distillation_from_the_exact_teacher(cd_student, noise, ode_reference):
  """One step at mode precision 0.90-0.97 against the 100-NFE ODE's 0.98 (the toy analogue of
  CD's CIFAR-10 ratios to EDM, Song et al. 2023: x1.8 at one step, x1.5 at two), two steps
  closer. The second step re-noises to 3 mode std (sigma 0.3; ECT's 0.821 on CIFAR-10)."""
  predict = functools.partial(cd.predictions(CD_SETTINGS)["denoiser"], mlp)
  sample = lambda sigmas: np.asarray(jax.jit(lambda params, noise: (
      consistency_sampling.consistency_sample(predict, params, noise, None,
                                              jax.random.PRNGKey(8), sigmas,
                                              CD_SETTINGS.sigma_min)))(cd_student, noise))
  one, two = sample((20.0,)), sample((20.0, 0.3))
  endpoint = np.sqrt(np.mean(np.sum((one - ode_reference) ** 2, -1)))
  print(f"CD mode precision: 1 step {mode_precision(one):.4f}, 2 steps "
        f"{mode_precision(two):.4f}, ODE {mode_precision(ode_reference):.4f}; 1-step endpoint "
        f"RMSE {endpoint:.3f}")
  assert mode_precision(one) >= 0.90
  assert mode_precision(two) >= max(0.93, mode_precision(one) + 0.01)
  for x in (one, two):
    np.testing.assert_allclose(mode_shares(x), 1 / MODES, atol=0.02)
  # The student learned the teacher's map, not just its marginal: from the same noise it lands
  # near the ODE's endpoint (the modes are 1.5 apart).
  assert endpoint < 0.2


MEANFLOW_SETTINGS = ml_collections.ConfigDict(dict(
    time_mean=-0.4, time_std=1.0, data_proportion=0.75, adaptive_p=1.0, adaptive_eps=0.01,
    cfg_omega=1.0, cfg_kappa=0.0, cfg_interval=(0.0, 1.0)))


@pytest.fixture(scope="session")
def meanflow_student():
  """MeanFlow at the official settings (logit-normal(-0.4, 1) times, 75% r = t, adaptive
  weight p = 1), unconditional."""
  loss = functools.partial(meanflow.loss, settings=MEANFLOW_SETTINGS, class_dropout=0.0)
  return train(loss, init_mlp(jax.random.PRNGKey(1), second_time=True), 3000, lr=2e-3)


def test_meanflow_jumps_against_its_own_ode(meanflow_student, noise):
  """Few jumps close to 100 Euler steps of the model's own velocity u(z, t, t) (Geng et al.
  2025): 4 jumps within 0.01 of its mode precision, 2 jumps at least 0.95."""
  labels = jnp.zeros(NUM_SAMPLES, jnp.int32)
  jumps = lambda k: np.asarray(flow_map_lib.make_flow_map_sampler(
      functools.partial(meanflow.flow_map, mlp), num_steps=k, null_label=1)(
          meanflow_student, noise, labels))
  euler = np.asarray(sample_lib.make_sampler(  # 100 steps: on a fifth of the noise
      functools.partial(meanflow.velocity, mlp), solver="euler", num_steps=100, null_label=1)(
          meanflow_student, noise[:NUM_SAMPLES // 5], labels[:NUM_SAMPLES // 5]))
  samples = {k: jumps(k) for k in (1, 2, 4)}
  precision = {k: mode_precision(x) for k, x in samples.items()}
  print("MeanFlow mode precision by jumps", precision, "Euler-100", mode_precision(euler))
  assert mode_precision(euler) >= 0.98
  assert precision[4] >= mode_precision(euler) - 0.01
  assert precision[2] >= 0.95
  # One jump is far from one Euler step of a flow (precision 0: every sample at the mean), but
  # short of the stated figure at this budget (test_meanflow_one_jump_reaches_the_stated_figure).
  assert precision[1] >= 0.4
  np.testing.assert_allclose(mode_shares(samples[2]), 1 / MODES, atol=0.03)


@pytest.mark.xfail(strict=True, reason="one jump within 1-2x of 100 steps is expected after a "
                   "few thousand steps; at the official time sampling this CI-sized run reaches "
                   "~0.5 (0.86 after 10k steps): pairs with t - r > 0.9 are 4e-6 of the batch, "
                   "so the one-jump corner is extrapolated")
def test_meanflow_one_jump_reaches_the_stated_figure(meanflow_student, noise):
  one = flow_map_lib.make_flow_map_sampler(functools.partial(meanflow.flow_map, mlp),
                                           num_steps=1, null_label=1)(
      meanflow_student, noise, jnp.zeros(NUM_SAMPLES, jnp.int32))
  assert mode_precision(one) >= 0.90
