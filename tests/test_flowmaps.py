"""Shortcut models (objectives/shortcut.py), pair caches (data/pairs.py), reflow and 2-RF++
(objectives/reflow.py) and the re-anchoring sampler (sampling/reflow_sampler.py).

Oracles: Gaussian data N(m, S^2) per coordinate, whose flow is affine,
X(x, t, r) = (1 - r) m + a(r) / a(t) (x - (1 - t) m) with a(t) = sqrt((1 - t)^2 S^2 + t^2), so
the exact shortcut is s(x, t, d) = (x - X(x, t, t - d)) / d; the 1-D bimodal example of
Liu et al. (modes +-2, std 0.5) with its exact 1-RF velocity (the Gaussian-mixture posterior)
and its exact optimal map T(z) = F_data^-1(Phi(z)), whose one-step W2 is computed from
quantiles; pairs indexed by their noise key, so their values are known in advance.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import stats

from tesserax.backbones import vgg_lpips
from tesserax.core import config as config_lib, host
from tesserax.core.errors import TesseraxError
from tesserax.data import pairs
from tesserax.objectives import reflow, shortcut
from tesserax.objectives.context import Context
from tesserax.sampling import flow_map as flow_map_lib
from tesserax.sampling import sample as sample_lib
from tesserax.sampling import solvers, timesteps

HERE = os.path.dirname(os.path.abspath(__file__))
S, M = 0.7, 0.3


def a(t):
  return ((1 - t) ** 2 * S ** 2 + t ** 2) ** 0.5


def exact_flow_map(x, t, r, xp=np):
  """X(x, t, r) of Gaussian data N(M, S^2), t and r broadcast against x."""
  a_ = lambda t: xp.sqrt((1 - t) ** 2 * S ** 2 + t ** 2)
  return (1 - r) * M + a_(r) / a_(t) * (x - (1 - t) * M)


def exact_apply(error=0.0):
  """A network `apply(params, x, t, labels, s=d)` giving the exact shortcut, plus `error` x d
  (which breaks self-consistency)."""
  def apply(params, x, t, labels, s):
    del params, labels
    t, d = t.reshape((-1,) + (1,) * (x.ndim - 1)), s.reshape((-1,) + (1,) * (x.ndim - 1))
    return (x - exact_flow_map(x, t, t - d, jnp)) / d + error * x * d
  return apply


# Shortcut models.

def test_two_half_steps_equal_the_full_step_at_the_exact_field():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    big = 0.5 ** rng.integers(0, 7, 256)  # full steps D = 2d on the dyadic grid
    t = big * rng.integers(1, 1 / big + 1)  # t in {D, 2D, ..., 1}
    x = rng.normal(size=(256, 3))
    s_fn = lambda x, t, d: exact_apply()(None, x, t, None, d)
    target = shortcut.self_consistency_target(s_fn, jnp.asarray(x), jnp.asarray(t),
                                              jnp.asarray(big))
    full = (x - exact_flow_map(x, t[:, None], (t - big)[:, None])) / big[:, None]
    np.testing.assert_allclose(target, full, rtol=1e-10, atol=1e-12)
    wrong = lambda x, t, d: exact_apply(0.1)(None, x, t, None, d)
    assert np.abs(shortcut.self_consistency_target(wrong, x, t, big) - full).max() > 1e-3


def test_the_official_bootstrap_layout_and_a_zero_bootstrap_loss_at_the_exact_field():
  # kvfrans/shortcut-models: B/8 rows, levels 6..0 (d = 1/64 ... 1) in equal blocks, rest d = 1.
  d = shortcut.bootstrap_step_sizes(32, 128)
  np.testing.assert_array_equal(d, [1 / 64] * 4 + [1 / 32] * 4 + [1 / 16] * 4 + [1 / 8] * 4
                                + [1 / 4] * 4 + [1 / 2] * 4 + [1.0] * 8)
  settings = ml_collections.ConfigDict(dict(denoise_timesteps=128, bootstrap_every=4,
                                            bootstrap_ema=True, bootstrap_cfg=False,
                                            cfg_scale=1.5))
  key = jax.random.PRNGKey(0)
  batch = {"image": M + S * jax.random.normal(key, (64, 2, 2, 1)),
           "label": jnp.zeros(64, jnp.int32)}
  ctx = Context(step=0, key=jax.random.PRNGKey(1), num_classes=10, ema={})
  metrics = jax.jit(lambda error: shortcut.loss(exact_apply(error), {}, batch, ctx,
                                                settings=settings, class_dropout=0.1)[1])
  exact, wrong = metrics(0.0), metrics(0.1)
  assert exact["loss_bootstrap"] < 1e-9 < 1e-2 < exact["loss_flow"]
  assert wrong["loss_bootstrap"] > 1e-4


@pytest.mark.parametrize("jumps", [1, 2, 4])
def test_exact_shortcut_jumps_transport_noise_exactly(jumps):
  noise = jax.random.normal(jax.random.PRNGKey(2), (8, 2, 2, 1))
  predict = lambda params, x, t, s, y: shortcut.flow_map(exact_apply(), params, x, t, s, y)
  sample = flow_map_lib.make_flow_map_sampler(predict, num_steps=jumps, null_label=10)
  out = sample({}, noise, jnp.zeros(8, jnp.int32))
  np.testing.assert_allclose(out, M + S * np.asarray(noise), rtol=1e-5, atol=1e-5)


def test_shortcut_trains_a_dit_and_samples_in_one_jump():
  from flax import nnx
  from tesserax.core import registry
  import tesserax.generators  # noqa: F401  (registers the DiT)
  config = config_lib.load("digits_shortcut:tiny")
  config.model.update(depth=1, hidden_size=32)
  objective = registry.OBJECTIVES.get("shortcut")(config)
  graphdef, params = nnx.split(registry.NETWORKS.get("dit")(config.model, rngs=nnx.Rngs(0)))
  apply = lambda p, x, t, y, train=False, s=None: nnx.merge(graphdef, p)(x, t, y, train, s=s)
  batch = {"image": jax.random.uniform(jax.random.PRNGKey(0), (16, 16, 16, 1), minval=-1),
           "label": jnp.arange(16, dtype=jnp.int32) % 10}
  ctx = Context(step=0, key=jax.random.PRNGKey(1), num_classes=10, ema=params)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(apply, p, batch, ctx), has_aux=True))(params)
  assert np.isfinite(loss) and set(metrics) == {"loss", "loss_flow", "loss_bootstrap"}
  assert float(optax.tree.norm(grads)) > 0
  settings = config.sample.copy_and_resolve_references()
  predictions = {k: (lambda f: lambda *args: f(apply, *args))(f)
                 for k, f in objective.predictions.items()}
  sample = sample_lib.build(settings, predictions, null_label=10)  # one jump
  out = sample(params, jnp.ones((2, 16, 16, 1)), jnp.zeros(2, jnp.int32), None)
  assert out.shape == (2, 16, 16, 1) and np.all(np.isfinite(out))


# Pair caches.

def teacher(noise, labels):
  """A stand-in teacher: 8 Heun steps of the exact field of Gaussian data N(M, S^2), then a
  label-dependent shift (so the labels reach the samples)."""
  def v(x, t):
    return -M + (t - (1 - t) * S ** 2) / a(t) ** 2 * (x - (1 - t) * M)
  x0 = solvers.heun(v, noise, timesteps.time_grid(8))
  return x0 + 0.01 * labels.reshape((-1,) + (1,) * (noise.ndim - 1))


MAKER = {"workdir": "teacher_a", "step": 100, "sampler": "heun", "num_steps": 8}
PAIRS = dict(maker=MAKER, shape=(2, 2, 1), num_classes=3, num_pairs=22, seed=5, shard_size=8)

_WORKER = """
import sys
sys.path.insert(0, {here!r})
import jax, numpy as np
from jax.sharding import Mesh
import test_flowmaps as t
from tesserax.data import pairs
assert jax.device_count() == 8
one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
pairs.generate(t.teacher, {one_dir!r}, batch_size=5, mesh=one, log=lambda *_: None, **t.PAIRS)
pairs.generate(t.teacher, {eight_dir!r}, batch_size=8, log=lambda *_: None, **t.PAIRS)
"""


@pytest.fixture(scope="session")
def device_caches(tmp_path_factory):
  """Pair caches written on 1 and on 8 (fake CPU) devices, in a subprocess."""
  root = tmp_path_factory.mktemp("pairs")
  one_dir, eight_dir = str(root / "one"), str(root / "eight")
  env = dict(host.xla_flags_env(os.environ, "--xla_force_host_platform_device_count=8"),
             TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  code = _WORKER.format(here=HERE, one_dir=one_dir, eight_dir=eight_dir)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return one_dir, eight_dir


@pytest.mark.xdist_group("flowmaps_pairs")  # share the subprocess caches
def test_pair_cache_is_the_same_on_1_and_8_devices(device_caches):
  one, eight = (pairs.load(d) for d in device_caches)
  np.testing.assert_array_equal(one["noise"], eight["noise"])
  np.testing.assert_allclose(one["image"], eight["image"], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(one["index"], np.arange(22))
  np.testing.assert_array_equal(one["label"], np.arange(22) % 3)
  expected_noise = [jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(5), i), (2, 2, 1))
                    for i in range(22)]
  np.testing.assert_allclose(one["noise"], np.stack(expected_noise), rtol=0, atol=1e-7)
  exact = M + S * one["noise"] + 0.01 * one["label"][:, None, None, None]
  np.testing.assert_allclose(one["image"], exact, atol=5e-3)  # the teacher's 8 Heun steps


@pytest.mark.xdist_group("flowmaps_pairs")  # share the subprocess caches
def test_pair_cache_resumes_after_a_kill(device_caches, tmp_path):
  out_dir = str(tmp_path / "pairs")
  calls = []

  def killed_after_two_batches(noise, labels):
    if len(calls) == 2:
      raise KeyboardInterrupt
    calls.append(1)
    return teacher(noise, labels)

  with pytest.raises(KeyboardInterrupt):
    pairs.generate(killed_after_two_batches, out_dir, batch_size=4, log=lambda *_: None, **PAIRS)
  with pytest.raises(TesseraxError, match="incomplete"):
    pairs.check(out_dir, MAKER, (2, 2, 1))
  calls.clear()
  counted = lambda noise, labels: calls.append(1) or teacher(noise, labels)
  pairs.generate(counted, out_dir, batch_size=4, log=lambda *_: None, **PAIRS)
  assert len(calls) == 4  # shard 0 (two batches) was kept; shards 1 and 2 took 2 + 2 batches
  resumed, straight = pairs.load(out_dir), pairs.load(device_caches[0])
  for k in ("noise", "label", "index"):
    np.testing.assert_array_equal(resumed[k], straight[k])
  np.testing.assert_allclose(resumed["image"], straight["image"], rtol=0, atol=1e-6)


@pytest.mark.xdist_group("flowmaps_pairs")  # share the subprocess caches
def test_a_pair_cache_of_another_teacher_or_resolution_is_refused_in_one_line(device_caches):
  cache_dir = device_caches[0]
  assert pairs.check(cache_dir, MAKER, (2, 2, 1))["num_pairs"] == 22
  for maker, shape in ((dict(MAKER, workdir="teacher_b"), (2, 2, 1)), (MAKER, (4, 4, 1))):
    with pytest.raises(TesseraxError, match="^pair cache .* was made by .*; this run needs") as e:
      pairs.check(cache_dir, maker, shape)
    assert "\n" not in str(e.value)
  with pytest.raises(TesseraxError, match="holds a pair cache of another maker"):
    pairs.generate(teacher, cache_dir, **dict(PAIRS, maker=dict(MAKER, num_steps=16)))


# Reflow, 2-RF++ and the re-anchoring sampler.

MODES, SIGMA = 2.0, 0.5


def bimodal_velocity(x, t):
  """The exact 1-RF velocity E[eps - x0 | x_t = x] of 0.5 N(-2, 0.5^2) + 0.5 N(2, 0.5^2)."""
  t = jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1)) if jnp.ndim(t) else t
  logw, v = [], []
  for mu in (-MODES, MODES):
    mean, var = (1 - t) * mu, (1 - t) ** 2 * SIGMA ** 2 + t ** 2
    logw.append(-0.5 * (x - mean) ** 2 / var - 0.5 * jnp.log(var))
    v.append(t / var * (x - mean) - (mu + (1 - t) * SIGMA ** 2 / var * (x - mean)))
  w = jax.nn.softmax(jnp.stack(logw), axis=0)
  return w[0] * v[0] + w[1] * v[1]


def w2_to_bimodal(samples, quantiles):
  """W2 between the empirical samples taken at the noise quantiles and the data."""
  return float(np.sqrt(np.mean((np.sort(np.asarray(samples, np.float64).ravel())
                                - quantiles) ** 2)))


def tiny_mlp_apply(params, x, t, labels, s=None):
  """A 1-D velocity MLP over Fourier features of x and t."""
  del labels, s
  k = jnp.arange(1, 9)
  t = t[:, None]
  h = jnp.concatenate([x, jnp.sin(np.pi * k * t), jnp.cos(np.pi * k * t),
                       jnp.sin(2 * k * x), jnp.cos(2 * k * x)], -1)
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    h = jax.nn.silu(h) if i < len(params) - 1 else h
  return h


def test_reflow_straightens_the_bimodal_1d_flow(tmp_path):
  u = (np.arange(4000) + 0.5) / 4000
  grid = np.linspace(-6, 6, 200001)
  cdf = 0.5 * (stats.norm.cdf(grid, -MODES, SIGMA) + stats.norm.cdf(grid, MODES, SIGMA))
  quantiles = np.interp(u, cdf, grid)  # the exact data quantiles
  z_eval = jnp.asarray(stats.norm.ppf(u), jnp.float32)[:, None]
  one_step = solvers.euler(bimodal_velocity, z_eval, timesteps.time_grid(1))
  assert abs(w2_to_bimodal(one_step, quantiles) - np.sqrt(4.25)) < 0.01  # collapse to the mean

  # 2-RF: pairs from 100 Heun steps of the 1-RF field, through a pair cache.
  heun100 = lambda noise, labels: solvers.heun(bimodal_velocity, noise, timesteps.time_grid(100))
  cache_dir = pairs.generate(jax.jit(heun100), str(tmp_path / "pairs"), maker={"exact": "1-RF"},
                             shape=(1,), num_classes=1, num_pairs=4096, shard_size=4096,
                             batch_size=4096, log=lambda *_: None)
  data = pairs.load(cache_dir)
  noise, images = jnp.asarray(data["noise"]), jnp.asarray(data["image"])
  config = ml_collections.ConfigDict(dict(objective=dict(
      name="reflow", time_sampling="u_shaped", u_shape_a=4.0, loss="mse", lpips_divt=False)))
  objective = reflow.make(config)
  sizes = [(33, 64), (64, 64), (64, 64), (64, 1)]
  keys = jax.random.split(jax.random.PRNGKey(1), len(sizes))
  params = [{"w": jax.random.normal(k, s) / np.sqrt(s[0]), "b": jnp.zeros(s[1])}
            for k, s in zip(keys, sizes)]
  steps = 2000
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.01))

  def step(carry, key):
    params, opt = carry
    key_batch, key_loss = jax.random.split(key)
    idx = jax.random.randint(key_batch, (256,), 0, 4096)
    batch = {"noise": noise[idx], "image": images[idx], "label": jnp.zeros(256, jnp.int32)}
    ctx = Context(step=0, key=key_loss, num_classes=1)
    grads, _ = jax.grad(lambda p: objective.loss(tiny_mlp_apply, p, batch, ctx),
                        has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), None

  train = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)),
                                         jax.random.split(jax.random.PRNGKey(2), steps))[0][0])
  params = train(params)
  velocity = lambda x, t: objective.predictions["velocity"](
      tiny_mlp_apply, params, x, jnp.full(x.shape[:1], t), None)
  one_step = solvers.euler(velocity, z_eval, timesteps.time_grid(1))
  assert w2_to_bimodal(one_step, quantiles) < 0.1


def test_u_shaped_time_has_the_2rfpp_density():
  t = np.asarray(jax.jit(reflow.u_shaped_time, static_argnums=(1, 2))(
      jax.random.PRNGKey(0), 20000, 4.0), np.float64)
  assert t.min() >= 1e-5 and t.max() <= 1 - 1e-5
  s = np.sort((t - 1e-5) / (1 - 2e-5))
  cdf = (np.expm1(4 * s) + np.exp(4.0) - np.exp(4 * (1 - s))) / (2 * np.expm1(4.0))
  assert np.abs(cdf - (np.arange(1, 20001) - 0.5) / 20000).max() < 0.015


def test_lpips_huber_matches_its_formula():
  rng = np.random.default_rng(0)
  x, z = rng.uniform(-1, 1, (6, 4, 4, 3)), rng.normal(size=(6, 4, 4, 3))
  pred = rng.normal(size=(6, 4, 4, 3))
  apply = lambda params, x_t, t, labels: jnp.asarray(pred, jnp.float32)
  taps = lambda images: [images, images[:, ::2, ::2] ** 2]
  perceptual = lambda a, b: vgg_lpips.headless_distance(taps(a), taps(b))
  config = ml_collections.ConfigDict(dict(objective=dict(
      name="reflow", time_sampling="u_shaped", u_shape_a=4.0, loss="lpips_huber",
      lpips_divt=True, perceptual="digits_net")))
  objective = reflow.make(config)
  key = jax.random.PRNGKey(3)
  batch = {"image": jnp.asarray(x, jnp.float32), "noise": jnp.asarray(z, jnp.float32),
           "label": jnp.zeros(6, jnp.int32)}
  ctx = Context(step=0, key=key, num_classes=1, perceptual=perceptual)
  loss, _ = jax.jit(lambda batch: objective.loss(apply, None, batch, ctx))(batch)
  t = np.asarray(reflow.sample_time(key, 6, config.objective), np.float64)[:, None, None, None]
  d = 4 * 4 * 3
  c = 0.00054 * d
  huber = (np.sqrt(np.sum((pred - (z - x)) ** 2, axis=(1, 2, 3)) + c * c) - c) / d
  x_hat = (1 - t) * x + t * z - t * pred

  def distance(f, g):
    unit = lambda f: f / (np.sqrt(np.sum(f ** 2, -1, keepdims=True)) + 1e-10)
    return np.mean(np.sum((unit(f) - unit(g)) ** 2, -1).reshape(6, -1), 1)

  lpips = (distance(x_hat, x) + distance(x_hat[:, ::2, ::2] ** 2, x[:, ::2, ::2] ** 2))
  expected = np.mean((1 - t.ravel()) * huber + lpips / t.ravel())
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  config.objective.perceptual = ""
  with pytest.raises(TesseraxError, match="needs a perceptual network"):
    reflow.make(config)


def _flow_settings(solver, num_steps):
  return ml_collections.ConfigDict(dict(solver=solver, num_steps=num_steps, shift=1.0,
                                        cfg_scale=1.0, interval=(0.0, 1.0),
                                        guided_channels=None))


@pytest.mark.parametrize("solver", ["reflow_new", "reflow_new_heun"])
def test_the_reanchoring_sampler(solver):
  noise = np.random.default_rng(1).normal(size=(16, 1))
  # A straight coupling (z -> S z): every step lands on the line, so any N is exact.
  straight = lambda x, t: x * (1 - S) / ((1 - t) * S + t)
  predict = lambda params, x, t, labels: straight(x, t[:, None])
  for n in (1, 3):
    out = sample_lib.build(_flow_settings(solver, n), {"velocity": predict}, null_label=1)(
        None, jnp.asarray(noise, jnp.float32), jnp.zeros(16, jnp.int32), None)
    np.testing.assert_allclose(out, S * noise, rtol=1e-5, atol=1e-6)
  # A curved field (Gaussian data's 1-RF velocity), against rfpp's update written out in float64.
  curved = lambda x, t: (x * (t - (1 - t) * S ** 2) / a(t) ** 2)
  times = np.linspace(1, 0, 5)
  z = noise.copy()
  for i in range(4):
    t, t_next = times[i], times[i + 1]
    v = curved(z, t)
    if solver == "reflow_new_heun" and i < 3:
      v = (v + curved((1 - t_next) * (z - t * v) + t_next * noise, t_next)) / 2
    z = (1 - t_next) * (z - t * v) + t_next * noise
  predict = lambda params, x, t, labels: curved(x, t[:, None])
  out = sample_lib.build(_flow_settings(solver, 4), {"velocity": predict}, null_label=1)(
      None, jnp.asarray(noise, jnp.float32), jnp.zeros(16, jnp.int32), None)
  np.testing.assert_allclose(out, z, rtol=1e-5, atol=1e-5)
  assert np.abs(z - S * noise).max() > 1e-3  # the curved field is not solved exactly


def test_flow_map_samplers_refuse_networks_without_the_second_time_input():
  config = config_lib.load("digits_shortcut:tiny")
  config.model.second_time = False
  with pytest.raises(TesseraxError, match="^objective shortcut needs a network with a second "
                                          "time input"):
    shortcut.make(config)
  with pytest.raises(TesseraxError, match="^flow_map needs flow_map; this model gives velocity$"):
    sample_lib.build(_flow_settings("flow_map", 1), {"velocity": None}, null_label=10)


# Improved MeanFlow.

def exact_average_velocity(z, t, r):
  """(u(z, r, t), v(z, t)) of Gaussian data N(M, S^2): (z - X(z, t, r)) / (t - r), and its
  r -> t limit."""
  tb, rb = t[:, None], r[:, None]
  v = -M + (tb - (1 - tb) * S ** 2) / a(tb) ** 2 * (z - (1 - tb) * M)
  gap = jnp.where(tb > rb, tb - rb, 1.0)
  return jnp.where(tb > rb, (z - exact_flow_map(z, tb, rb, jnp)) / gap, v), v


def test_imf_compound_velocity_is_the_velocity_at_the_exact_average_velocity():
  from tesserax.objectives import imf
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(0)
    z = jax.random.normal(key, (64, 3), jnp.float64)
    t = jax.random.uniform(jax.random.fold_in(key, 1), (64,), jnp.float64, 0.2, 1.0)
    r = t * jax.random.uniform(jax.random.fold_in(key, 2), (64,), jnp.float64)
    v = exact_average_velocity(z, t, t)[1]
    compound, head = imf.compound_velocity(exact_average_velocity, z, t, r, v)
    np.testing.assert_allclose(compound, v, rtol=1e-9, atol=1e-12)  # u = v - (t - r) du/dt
    np.testing.assert_array_equal(head, v)
    compound, _ = imf.compound_velocity(exact_average_velocity, z, t, r, 1.1 * v)
    assert np.abs(compound - v).max() > 1e-3  # the tangent must be the velocity


def test_imf_guidance_conditions_and_target():
  from tesserax.objectives import imf
  fm = jnp.arange(20000) < 10000
  omega, t_min, t_max = imf.sample_guidance(jax.random.PRNGKey(0), fm, 7.0)
  w = np.sort(np.log(np.asarray(omega[10000:])) / np.log(8.0))  # log-uniform on [1, 8]
  assert np.abs(w - (np.arange(1, 10001) - 0.5) / 10000).max() < 0.02
  assert np.all(t_min[:10000] == 0) and np.all(t_max[:10000] == 1)
  assert 0 <= t_min[10000:].min() and t_min[10000:].max() <= 0.5 <= t_max[10000:].min()

  rng = np.random.default_rng(0)
  z, v, cond, uncond = (rng.normal(size=(6, 2)) for _ in range(4))
  t = np.array([0.3, 0.9, 0.3, 0.9, 0.45, 0.45])
  fm = np.array([True, True, False, False, False, False])
  omega = np.array([3.0, 5.0, 3.0, 5.0, 2.0, 4.0])
  t_min, t_max = np.array([0, 0, 0.2, 0.2, 0.5, 0.1]), np.array([1, 1, 0.6, 0.6, 0.9, 0.4])
  labels = np.array([1, 2, 3, 4, 5, 6])

  def v_head(z, t, w, y):  # a conditional velocity that depends on omega, a fixed null one
    w, y = np.asarray(w)[:, None], np.asarray(y)[:, None]
    return jnp.asarray(np.where(y == 10, np.tile(uncond, (2, 1))[:len(y)],
                                np.tile(cond, (2, 1))[:len(y)] * (1 + 0.1 * w)))

  v_g, v_c = imf.guided_target(v_head, v, z, t, labels, 10, fm, omega, t_min, t_max)
  inside = fm | ((t >= t_min) & (t <= t_max))  # rows 0, 1, 2 guided; 3, 4, 5 outside
  w = np.where(inside, omega, 1.0)[:, None]
  expected = v + (1 - 1 / w) * (cond * (1 + 0.1 * w) - uncond)
  np.testing.assert_allclose(v_g, expected, rtol=1e-6)
  np.testing.assert_allclose(v_g[3:], v[3:], rtol=1e-6)
  np.testing.assert_allclose(v_c, cond * (1 + 0.1 * w), rtol=1e-6)


def test_imf_trains_and_samples_through_the_diffusion_task():
  from tesserax.core import sharding
  from tesserax.objectives import imf
  from tesserax.tasks import diffusion
  config = config_lib.load("digits_dit:tiny")
  config.model.update(depth=2, hidden_size=32, time_scale=1.0)
  config.objective = dict(name="imf", time_mean=-0.4, time_std=1.0, data_proportion=0.5,
                          adaptive_p=1.0, adaptive_eps=0.01, cfg_s_max=7.0, sample_omega=2.0,
                          sample_interval=(0.0, 1.0))
  with pytest.raises(TesseraxError, match="^objective imf needs a network with a second time"):
    imf.make(config)
  config.model.update(second_time=True, guidance_conditions=True, velocity_head_depth=1)
  task = diffusion.DiffusionTask(config, sharding.local_mesh())  # the task passes guidance
  batch = {"image": jax.random.uniform(jax.random.PRNGKey(0), (16, 16, 16, 1), minval=-1),
           "label": jnp.arange(16, dtype=jnp.int32) % 10}
  state, metrics = task.train_step(task.init(), batch)
  assert np.isfinite(metrics["loss"]) and {"loss", "loss_u", "loss_v"} <= set(metrics)
  out = task.predict["generate"](state["ema"], np.zeros(2, np.int32), jax.random.PRNGKey(2),
                                 _flow_settings("flow_map", 1))
  assert out.shape == (2, 16, 16, 1) and np.all(np.isfinite(out))


def test_online_reflow_pairs_come_from_the_teacher():
  """Without pairs in the batch, reflow draws them from the context's teacher: on a straight
  teacher (z -> S z) one Euler step gives exact pairs, which the same field fits exactly."""
  straight = lambda params, x, t, labels: x * (1 - S) / ((1 - t[:, None]) * S + t[:, None])
  config = ml_collections.ConfigDict(dict(objective=dict(
      name="reflow", time_sampling="uniform", loss="mse", online_steps=1, online_solver="euler",
      online_cfg_scale=1.0)))
  objective = reflow.make(config)
  batch = {"image": jnp.zeros((32, 3)), "label": jnp.zeros(32, jnp.int32)}
  ctx = Context(step=0, key=jax.random.PRNGKey(0), num_classes=1, teacher=(straight, None))
  loss, _ = jax.jit(lambda: objective.loss(straight, None, batch, ctx))()
  assert float(loss) < 1e-10
  shifted = lambda params, x, t, labels: straight(params, x, t, labels) + 0.1
  assert float(jax.jit(lambda: objective.loss(shifted, None, batch, ctx))()[0]) > 5e-3
  with pytest.raises(TesseraxError, match="needs a teacher"):
    objective.loss(straight, None, batch, ctx._replace(teacher=None))
