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

Consistency training from the data alone (objectives/ict.py, ect.py, scm.py) is compared with
CD as fewstep.md Sec. 10.3 asks: iCT from scratch, ECT from a flow-matching MLP
(objectives/rectified_flow.py) and sCT with tangent normalisation on and off. These students see
the times through three frequencies pi (1, 2, 4) instead of eight up to 128 pi: the
continuous-time tangent differentiates the network in time, and with the high frequencies sCT and
sCD learn nothing (1-step mode precision below 0.05); sCM Sec. 5 asks for low-frequency time
embeddings for the same reason.
"""
import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tesserax.objectives import cd, ect, ict, meanflow, rectified_flow, scm
from tesserax.objectives.context import Context
from tesserax.sampling import consistency as consistency_sampling
from tesserax.sampling import flow_map as flow_map_lib
from tesserax.sampling import sample as sample_lib
from tesserax.sampling import solvers, timesteps

RADIUS, STD, MODES = 2.0, 0.1, 8
MEANS = np.array([[RADIUS * math.cos(2 * math.pi * k / MODES),
                   RADIUS * math.sin(2 * math.pi * k / MODES)] for k in range(MODES)],
                 np.float32)
SIGMA_DATA = math.sqrt(RADIUS ** 2 / 2 + STD ** 2)  # the data's std per coordinate, 1.418
WIDTH, X_FEATURES = 128, 64
TIME_FREQUENCIES = math.pi * 2.0 ** np.arange(8, dtype=np.float32)
CM_FREQUENCIES = math.pi * 2.0 ** np.arange(3, dtype=np.float32)
NUM_SAMPLES = 10000
# The training runs below are one program run thousands of times, so they are compiled as the
# `tesserax` command compiles (core/host.py), not at the suite's quick-compile settings
# (conftest.py): 1,500 iCT steps took 8.1-9.0 s compiled so, 10.6-10.8 s with the classic
# emitters (jaxlib < 0.11, where conftest.py chooses them).
RUN_MANY_TIMES = {"xla_backend_optimization_level": 1}
if "--xla_cpu_use_fusion_emitters=false" in os.environ.get("XLA_FLAGS", ""):
  RUN_MANY_TIMES["xla_cpu_use_fusion_emitters"] = True


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


def time_features(t, frequencies=TIME_FREQUENCIES):
  t = jnp.reshape(t, (-1, 1))
  return [t, jnp.sin(t * frequencies), jnp.cos(t * frequencies)]


def init_mlp(key, second_time=False, frequencies=TIME_FREQUENCIES):
  times = (2 if second_time else 1) * (1 + 2 * len(frequencies))
  sizes = [2 + 2 * X_FEATURES + times, WIDTH, WIDTH, WIDTH, 2]
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (m, n)) / math.sqrt(m), "b": jnp.zeros(n)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params, x, t, labels, *, train=False, s=None, frequencies=TIME_FREQUENCIES):
  del labels, train
  h = [x, jnp.sin(x @ FOURIER), jnp.cos(x @ FOURIER)] + time_features(t, frequencies)
  h = jnp.concatenate(h + (time_features(s, frequencies) if s is not None else []), -1)
  for layer in params[:-1]:
    h = jax.nn.silu(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


cm_mlp = functools.partial(mlp, frequencies=CM_FREQUENCIES)


def init_scm_mlp(key):
  return {"net": init_mlp(key, frequencies=CM_FREQUENCIES),
          "logvar": jnp.zeros((1 + 2 * len(CM_FREQUENCIES), 1))}


def scm_mlp(params, x, t, labels, *, train=False, s=None):
  """cm_mlp and one more channel, sCM's learned log-variance u(t): a zero-initialised linear map
  of the time features alone (generators/dit.py `logvar_head`)."""
  logvar = jnp.concatenate(time_features(t, CM_FREQUENCIES), -1) @ params["logvar"]
  return jnp.concatenate([cm_mlp(params["net"], x, t, labels, train=train, s=s), logvar], -1)


def pixels(apply):
  """apply over points [B, 2] as over one-pixel NHWC images [B, 1, 1, 2], the layout that
  rectified_flow.py and scm.py index."""

  def image_apply(params, x, t, labels, **kwargs):
    out = apply(params, jnp.reshape(x, (x.shape[0], -1)), t, labels, **kwargs)
    return jnp.reshape(out, x.shape[:-1] + out.shape[-1:])

  return image_apply


def train(loss, params, steps, *, lr, batch_size=256, teacher=None, ema_decay=0.995, seed=0,
          apply=mlp, image=False):
  """The EMA parameters after `steps` Adam steps (cosine decay) of `loss(apply, params, batch,
  ctx)` on fresh mixture samples; the context carries the EMA and the teacher. `image`: the
  batch as one-pixel images (`pixels`)."""
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
  shape, apply = ((1, 1, 2), pixels(apply)) if image else ((2,), apply)

  def step(carry, i):
    params, opt_state, ema = carry
    key_data, key_loss = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i))
    batch = {"image": jnp.reshape(sample_data(key_data, batch_size), (batch_size,) + shape),
             "label": jnp.zeros(batch_size, jnp.int32)}
    ctx = Context(step=i, key=key_loss, num_classes=1, ema=ema, teacher=teacher)
    grads = jax.grad(lambda p: loss(apply, p, batch, ctx)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    return (params, opt_state, ema), None

  run = jax.jit(lambda params: jax.lax.scan(step, (params, tx.init(params), params),
                                            jnp.arange(steps))[0][2],
                compiler_options=RUN_MANY_TIMES)
  return jax.block_until_ready(run(params))


def consistency_samples(predict, params, noise, sigma_min, levels=((20.0,), (20.0, 0.3))):
  """Multistep consistency sampling (Song et al. 2023, Alg. 1) through each descending level
  sequence: one step from sigma 20, and two that re-noise to 3 mode std (sigma 0.3; ECT's 0.821
  on CIFAR-10)."""
  return [np.asarray(jax.jit(lambda params, noise: consistency_sampling.consistency_sample(
      predict, params, noise, None, jax.random.PRNGKey(8), sigmas, sigma_min))(params, noise))
          for sigmas in levels]


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
  closer (consistency_samples)."""
  predict = functools.partial(cd.predictions(CD_SETTINGS)["denoiser"], mlp)
  one, two = consistency_samples(predict, cd_student, noise, CD_SETTINGS.sigma_min)
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


def report(name, one, two, ode_reference):
  print(f"{name} mode precision: 1 step {mode_precision(one):.4f}, 2 steps "
        f"{mode_precision(two):.4f}, ODE {mode_precision(ode_reference):.4f}")


ICT_STEPS, CT_BATCH = 8000, 1024  # consistency training: larger batches than CD's 256
ICT_SETTINGS = ml_collections.ConfigDict(ict.defaults(sigma_max=20.0, sigma_data=1.0, p_mean=0.5,
                                                      p_std=1.5))


@pytest.fixture(scope="session")
def ict_student():
  """iCT from scratch: pseudo-Huber (c = 0.00054 sqrt 2), the log-normal proposal over the grid,
  N 10 -> 1280 doubling every K / 8 steps, theta- = sg(theta), weight 1 / (sigma_{i+1} -
  sigma_i). The sigma range is CD's; the proposal (0.5, 1.5) is moved to large sigma from the
  paper's (-1.1, 2.0), which gives 1 step 0.872 here. Batches of 1024: at CD's 256 one step
  reached 0.887 after 6,000 steps and 0.900 after 10,000; 512 gave 0.901 after 6,000."""
  loss = functools.partial(ict.loss, settings=ICT_SETTINGS, total_steps=ICT_STEPS)
  return train(loss, init_mlp(jax.random.PRNGKey(2), frequencies=CM_FREQUENCIES), ICT_STEPS,
               lr=2e-3, apply=cm_mlp, batch_size=CT_BATCH)


@pytest.mark.long  # thousands of batches of 1,024 in its fixture
def test_improved_consistency_training_from_scratch(ict_student, noise, ode_reference):
  """iCT without a teacher: measured 1 step 0.919, 2 steps 0.979 (ODE 0.987), in Sec. 10.3's
  0.90-0.97. CT is slower than CD (Sec. 10.3): CD reaches 0.91 after 4,000 steps of 256."""
  predict = functools.partial(cd.predictions(ICT_SETTINGS)["denoiser"], cm_mlp)
  one, two = consistency_samples(predict, ict_student, noise, ICT_SETTINGS.sigma_min)
  report("iCT", one, two, ode_reference)
  assert mode_precision(one) >= 0.90
  assert mode_precision(two) >= max(0.95, mode_precision(one) + 0.03)
  for x in (one, two):
    np.testing.assert_allclose(mode_shares(x), 1 / MODES, atol=0.02)


FLOW_SETTINGS = ml_collections.ConfigDict(dict(time_sampling="uniform", logit_mean=0.0,
                                               logit_std=1.0))


@pytest.fixture(scope="session")
def flow_teacher():
  """Flow matching of cm_mlp (objectives/rectified_flow.py, uniform t): ECT's start."""
  loss = functools.partial(rectified_flow.loss, settings=FLOW_SETTINGS, class_dropout=0.0)
  return train(loss, init_mlp(jax.random.PRNGKey(3), frequencies=CM_FREQUENCIES), 4000, lr=2e-3,
               apply=cm_mlp, image=True)


ECT_STEPS = 8000
ECT_SETTINGS = ml_collections.ConfigDict(ect.defaults(p_mean=0.5, p_std=1.5, sigma_data=1.0,
                                                      double_every=ECT_STEPS // 8))


@pytest.fixture(scope="session")
def ect_student(flow_teacher):
  """ECT tuning of the flow model: the gap r(t) halves 8 times over the run (run_ecm.sh: a stage
  every 25k of 200k steps), L2 norm with weight 1 / (t - r), the proposal as iCT's here."""
  loss = functools.partial(ect.loss, settings=ECT_SETTINGS)
  return train(loss, flow_teacher, ECT_STEPS, lr=2e-3, apply=cm_mlp, batch_size=CT_BATCH)


@pytest.mark.long  # thousands of batches of 1,024 in its fixture
def test_easy_consistency_tuning_from_a_flow_model(flow_teacher, ect_student, noise,
                                                   ode_reference):
  """ECT started from flow matching: measured 1 step 0.906, 2 steps 0.973 (ODE 0.987); batches
  of 256 gave 0.876 after 6,000 steps, 1024 0.901 after 6,000. The flow model's own one Euler
  step collapses onto the mean (exact: Sec. 10.1), so the gain is the tuning's; 100 Euler steps
  show the flow model trained. Its head start is small on this toy (batch 256): from scratch ECT
  reaches 0.72 / 0.80 / 0.876 after 1k / 2k / 6k steps, from the flow model 0.76 / 0.82 /
  0.876."""
  euler = lambda k, z: np.asarray(sample_lib.make_sampler(
      functools.partial(rectified_flow.velocity, cm_mlp), solver="euler", num_steps=k,
      null_label=1)(flow_teacher, z, jnp.zeros(z.shape[0], jnp.int32)))
  flow_one, flow_many = euler(1, noise), euler(100, noise[:NUM_SAMPLES // 5])
  predict = functools.partial(cd.predictions(ECT_SETTINGS)["denoiser"], cm_mlp)
  one, two = consistency_samples(predict, ect_student, noise, ECT_SETTINGS.sigma_min)
  report("ECT", one, two, ode_reference)
  print(f"its flow model: Euler 1 step {mode_precision(flow_one):.4f}, 100 steps "
        f"{mode_precision(flow_many):.4f}")
  assert mode_precision(flow_many) >= 0.93
  assert mode_precision(flow_one) <= 0.01
  assert mode_precision(one) >= 0.90
  assert mode_precision(two) >= max(0.95, mode_precision(one) + 0.03)
  for x in (one, two):
    np.testing.assert_allclose(mode_shares(x), 1 / MODES, atol=0.02)


SCT_STEPS = 6000
SCT_SETTINGS = ml_collections.ConfigDict(scm.defaults(sigma_data=SIGMA_DATA, p_mean=0.0,
                                                      p_std=1.4, warmup_steps=SCT_STEPS // 4))


@pytest.fixture(scope="session")
def sct_students():
  """sCT (TrigFlow, prior weighting, learned log-variance) with the tangent normalised, g / (||g||
  + 0.1): `SCT_STEPS` of `CT_BATCH`, and for the ablation 4,000 steps of 256 with the tangent
  normalised and raw (`tangent_normalization` off). sigma_d is the data's std and P_mean moves
  from CIFAR-10's -1.0 by ln(sigma_d / 0.5); the tangent warm-up takes the first quarter of each
  run (H = 10k of 400k in the paper)."""
  def run(steps, batch_size, **changes):
    settings = SCT_SETTINGS.copy_and_resolve_references()
    settings.update(warmup_steps=steps // 4, **changes)
    return train(functools.partial(scm.loss, settings=settings, distill=False),
                 init_scm_mlp(jax.random.PRNGKey(4)), steps, lr=2e-3, apply=scm_mlp, image=True,
                 batch_size=batch_size)
  return {"sct": run(SCT_STEPS, CT_BATCH), "ablation": run(4000, 256),
          "ablation_raw": run(4000, 256, tangent_normalization=False)}


@pytest.mark.long  # thousands of batches of 1,024 in its fixture
def test_sct_needs_tangent_normalisation(sct_students, noise, ode_reference):
  """sCT normalised: measured 1 step 0.922, 2 steps 0.977 (ODE 0.987). The ablation at a quarter
  of the batch and two thirds of the steps: normalised 0.878 / 0.951; with raw tangents (sCM Fig.
  5a) 0.41 / 0.82, and one step depends on where it starts: 0.72 from sigma 20, 0.30 from 200,
  where the normalised run gives 0.87-0.88 from either. At the full budget raw tangents reach
  0.85 / 0.94. sCD from the exact velocity behaves alike (batch 256): 0.85 / 0.93 normalised,
  0.60 / 0.66 raw."""
  predict = functools.partial(scm.predictions(SCT_SETTINGS)["denoiser"], scm_mlp)
  levels = ((80.0,), (80.0, 0.3))  # sampler scm's sigma_max
  (one, two), (ab_one, ab_two), (raw_one, raw_two) = [
      consistency_samples(predict, sct_students[name], noise, 0.0, levels)
      for name in ("sct", "ablation", "ablation_raw")]
  report("sCT", one, two, ode_reference)
  report("sCT ablation, normalised tangents", ab_one, ab_two, ode_reference)
  report("sCT ablation, raw tangents", raw_one, raw_two, ode_reference)
  assert mode_precision(one) >= 0.90
  assert mode_precision(two) >= max(0.93, mode_precision(one) + 0.03)
  np.testing.assert_allclose(mode_shares(two), 1 / MODES, atol=0.02)
  assert mode_precision(raw_one) <= mode_precision(ab_one) - 0.3
  assert mode_precision(raw_two) <= mode_precision(ab_two) - 0.08


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
