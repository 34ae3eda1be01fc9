"""SlimFlow (objectives/slimflow.py) and FlowTurbo (objectives/flowturbo.py,
sampling/flowturbo_sampler.py).

Oracles: Gaussian data N(M, S^2) per coordinate, whose flow is affine: the flow map is
X(x, t, r) = (1 - r) M + a(r) / a(t) (x - (1 - t) M) with a(t) = sqrt((1 - t)^2 S^2 + t^2), the
exact velocity its r-derivative at r = t, the exact noise -> data map T(z) = M + S z, and the
straight field of the coupling (z, T(z)); a float64 NumPy transcription of FlowTurbo's
released sample path (shiml20/FlowTurbo models_assemble.py) in its own t = 0-noise SiT time.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tesserax.core import config as config_lib, sharding
from tesserax.core.errors import TesseraxError
from tesserax.objectives import flowturbo, slimflow
from tesserax.objectives.context import Context
from tesserax.sampling import flowturbo_sampler, solvers, timesteps

S, M = 0.7, 0.3
SHAPE = (2, 2, 1)  # toy "images": four independent Gaussian coordinates


def exact_velocity(x, t, xp=np):
  """v(x, t) = dX(x, t, r)/dr at r = t (t broadcast against x)."""
  a_t = xp.sqrt((1 - t) ** 2 * S ** 2 + t ** 2)
  return -M + (t - (1 - t) * S ** 2) / a_t ** 2 * (x - (1 - t) * M)


def _bt(t, x):
  return jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1)) if jnp.ndim(t) else t


def teacher_apply(params, x, t, labels):
  del params, labels
  return exact_velocity(x, _bt(t, x), jnp)


def straight_apply(params, x, t, labels):
  """The velocity z - T(z) of the straight coupling (z, M + S z), at x = (1 - t) T(z) + t z."""
  del params, labels
  t = _bt(t, x)
  z = (x - (1 - t) * M) / ((1 - t) * S + t)
  return (1 - S) * z - M


# FlowTurbo.

def test_the_refiner_regresses_the_teachers_velocity_one_euler_step_later():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x_t, t = rng.normal(size=(64,) + SHAPE), rng.uniform(size=64)
    dt = 0.07
    x_next, t_next, u, target = flowturbo.teacher_step(
        lambda x, t, y: teacher_apply(None, x, t, y), jnp.asarray(x_t), jnp.asarray(t), dt,
        None, None)
    u_np = exact_velocity(x_t, t[:, None, None, None])
    np.testing.assert_allclose(u, u_np, rtol=1e-12)
    np.testing.assert_allclose(x_next, x_t - dt * u_np, rtol=1e-12)
    np.testing.assert_allclose(t_next, t - dt, rtol=1e-12)
    np.testing.assert_allclose(target, exact_velocity(x_t - dt * u_np, (t - dt)[:, None, None,
                                                                                  None]),
                               rtol=1e-12)

    # The loss vanishes exactly at the refiner r([x' | u], t') = v(x', t') - u, and an offset c
    # costs c^2.
    config = ml_collections.ConfigDict(dict(objective=dict(max_dt=0.12), model=dict(
        class_dropout=0.1, in_channels=2)))
    objective = flowturbo.make(config)

    def exact_refiner(offset):
      return lambda params, xu, t, labels: jnp.concatenate(
          [exact_velocity(xu[..., :1], _bt(t, xu), jnp) - xu[..., 1:] + offset] * 2, -1)

    batch = {"image": jnp.asarray(rng.normal(size=(256,) + SHAPE)),
             "label": jnp.zeros(256, jnp.int32)}
    ctx = Context(step=0, key=jax.random.PRNGKey(0), num_classes=10,
                  teacher=(teacher_apply, None))
    loss = jax.jit(lambda offset: objective.loss(exact_refiner(offset), None, batch, ctx)[0])
    assert float(loss(0.0)) < 1e-24
    np.testing.assert_allclose(loss(0.1), 0.01, rtol=1e-10)
    with pytest.raises(TesseraxError, match="^a FlowTurbo refiner takes"):
      flowturbo.make(ml_collections.ConfigDict(dict(
          objective=dict(max_dt=0.12), model=dict(class_dropout=0.1, in_channels=1)))).loss(
              exact_refiner(0.0), None, batch, ctx)
    with pytest.raises(TesseraxError, match="teacher.workdir"):
      objective.loss(exact_refiner(0.0), None, batch, ctx._replace(teacher=None))


def official_flowturbo(z, heun_steps, pseudo_steps, refine_steps, velocity, refiner):
  """FlowTurboAssemble.forward in SiT time (t = 0 noise, velocity data - noise), float64:
  `velocity(x, t)` and `refiner(x, t, v)` in that time."""
  n = heun_steps + pseudo_steps + refine_steps
  ts = np.linspace(0, 1, n + 1)
  dt = ts[1] - ts[0]
  x, d_cache, i = z, None, 0
  for _ in range(heun_steps):  # VelocityBlock(use_cache=False)
    d_i = velocity(x, ts[i])
    d_next = velocity(x + dt * d_i, ts[i + 1])
    x, d_cache, i = x + dt / 2 * (d_i + d_next), d_next, i + 1
  for _ in range(pseudo_steps):  # VelocityBlock(use_cache=True)
    d_i = d_cache if d_cache is not None else velocity(x, ts[i])
    d_next = velocity(x + dt * d_i, ts[i + 1])
    x, d_cache, i = x + dt / 2 * (d_i + d_next), d_next, i + 1
  v = d_cache
  for _ in range(refine_steps):  # VelocityRefinerBlock
    d_i = refiner(x, ts[i], v) + v
    d_next = refiner(x + dt * d_i, ts[i + 1], v) + d_i
    x, v, i = x + dt / 2 * (d_i + d_next), d_i, i + 1
  return x


MIXES = [(1, 0, 0), (0, 3, 0), (1, 2, 2), (0, 3, 3), (1, 3, 4), (2, 4, 3)]


def test_the_step_mix_matches_the_released_sampler_and_counts_its_evaluations():
  sit_velocity = lambda x, t: -exact_velocity(x, 1 - t)
  sit_refiner = lambda x, t, v: sit_velocity(x, t) - v + 0.05 * np.sin(3 * x)  # inexact
  z = np.random.default_rng(1).normal(size=(128,) + SHAPE)
  with jax.enable_x64(True):
    for heun_steps, pseudo_steps, refine_steps in MIXES:
      calls = {"v": 0, "r": 0}

      def velocity_fn(x, t):
        calls["v"] += 1
        return teacher_apply(None, x, t, None)

      def refiner_fn(x, t, u):
        calls["r"] += 1
        return exact_velocity(x, t, jnp) - u - 0.05 * jnp.sin(3 * x)

      num_steps = heun_steps + pseudo_steps + refine_steps
      times = np.linspace(1, 0, num_steps + 1)
      out = flowturbo_sampler.flowturbo(velocity_fn, refiner_fn, jnp.asarray(z), times,
                                        heun_steps, refine_steps)
      expected = official_flowturbo(z, heun_steps, pseudo_steps, refine_steps, sit_velocity,
                                    sit_refiner)
      np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
      # H: 2 teacher evaluations, P: 1 (it reuses the kept velocity; the first P step of a
      # mix without H evaluates it), R: none and 2 refiner evaluations.
      nfe = 2 * heun_steps + pseudo_steps + (heun_steps == 0 and pseudo_steps > 0)
      assert calls == {"v": nfe, "r": 2 * refine_steps}
      assert flowturbo_sampler.nfe(num_steps, heun_steps, refine_steps) == nfe
  for bad in ((4, 0, 4), (3, 2, 2), (3, -1, 0)):
    with pytest.raises(TesseraxError, match="^flowturbo"):
      flowturbo_sampler.nfe(*bad)


def test_flowturbo_with_the_exact_refiner_beats_euler_at_equal_nfe():
  z = np.random.default_rng(2).normal(size=(2048,) + SHAPE)
  exact = M + S * z  # X(z, 1, 0)
  velocity_fn = lambda x, t: exact_velocity(x, t, jnp)
  refiner_fn = lambda x, t, u: exact_velocity(x, t, jnp) - u
  rmse = lambda x: float(np.sqrt(np.mean((np.asarray(x, np.float64) - exact) ** 2)))
  with jax.enable_x64(True):
    for heun_steps, pseudo_steps, refine_steps in ((1, 2, 2), (1, 3, 4), (2, 4, 3)):
      num_steps = heun_steps + pseudo_steps + refine_steps
      nfe = flowturbo_sampler.nfe(num_steps, heun_steps, refine_steps)
      turbo = rmse(flowturbo_sampler.flowturbo(velocity_fn, refiner_fn, jnp.asarray(z),
                                               np.linspace(1, 0, num_steps + 1), heun_steps,
                                               refine_steps))
      euler = rmse(solvers.euler(velocity_fn, jnp.asarray(z), timesteps.time_grid(nfe)))
      assert turbo < euler / 2, (heun_steps, pseudo_steps, refine_steps, turbo, euler)


def test_a_refiner_trains_against_the_exact_teacher():
  """A few Adam steps of a small MLP refiner cut the refiner loss of the exact field."""
  config = ml_collections.ConfigDict(dict(objective=dict(max_dt=0.12), model=dict(
      class_dropout=0.0, in_channels=2)))
  objective = flowturbo.make(config)

  def mlp_refiner(params, xu, t, labels):
    del labels
    t = jnp.broadcast_to(_bt(t, xu), xu[..., :1].shape)
    h = jnp.concatenate([xu, t, t * xu], -1)
    h = jax.nn.silu(h @ params["w1"] + params["b1"]) @ params["w2"]
    return jnp.concatenate([h, h], -1)

  key = jax.random.PRNGKey(3)
  params = {"w1": jax.random.normal(key, (5, 32)) / 3, "b1": jnp.zeros(32),
            "w2": jnp.zeros((32, 1))}
  batch = {"image": M + S * jax.random.normal(jax.random.PRNGKey(4), (128,) + SHAPE),
           "label": jnp.zeros(128, jnp.int32)}
  ctx = lambda k: Context(step=0, key=k, num_classes=1, teacher=(teacher_apply, None))
  loss = lambda p, k: objective.loss(mlp_refiner, p, batch, ctx(k))[0]
  tx = optax.adam(1e-2)

  def step(carry, k):
    p, opt = carry
    updates, opt = tx.update(jax.grad(loss)(p, k), opt, p)
    return (optax.apply_updates(p, updates), opt), None

  keys = jax.random.split(jax.random.PRNGKey(5), 200)
  trained = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), keys)[0][0])(params)
  held_out = jax.random.split(jax.random.PRNGKey(6), 8)
  evaluate = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss(p, k))(held_out)))
  before, after = float(evaluate(params)), float(evaluate(trained))
  assert before > 1e-4 and after < 0.2 * before, (before, after)


# SlimFlow.

def _slimflow_config(**objective):
  settings = dict(name="slimflow", anneal_steps=100, time_sampling="uniform", loss="mse",
                  flow_guidance=False, h_flip=False, online_steps=1, online_solver="euler",
                  online_cfg_scale=1.0)
  settings.update(objective)
  return ml_collections.ConfigDict(dict(objective=settings, data=dict(resolution=2),
                                        model=dict(input_size=2, in_channels=1)))


def _exact_pairs(n, seed=0):
  z = np.random.default_rng(seed).normal(size=(n,) + SHAPE)
  return {"noise": jnp.asarray(z), "image": jnp.asarray(M + S * z),
          "label": jnp.zeros(n, jnp.int32)}


def test_slimflow_vanishes_at_the_exact_straight_map_once_annealed():
  with jax.enable_x64(True):
    batch = _exact_pairs(4096)
    objective = slimflow.make(_slimflow_config())
    loss_at = jax.jit(lambda step, apply=straight_apply: objective.loss(
        apply, None, batch, Context(step=step, key=jax.random.PRNGKey(0), num_classes=1))[0],
        static_argnums=1)
    # beta = 1 - step / 100: independent noise at 0, the teacher's pairs from 100 on.
    losses = [float(loss_at(step)) for step in (0, 50, 100, 200)]
    assert losses[0] > losses[1] > 0.01 and losses[2] < 1e-24 and losses[3] < 1e-24
    assert float(loss_at(100, teacher_apply)) > 1e-3  # the curved 1-RF field is not straight

    # Stage 2: one-step distillation plus flow guidance by the stage-1 student as teacher.
    distill = slimflow.make(_slimflow_config(anneal_steps=0, time_sampling="one_step",
                                             flow_guidance=True))
    ctx = Context(step=0, key=jax.random.PRNGKey(1), num_classes=1,
                  teacher=(straight_apply, None))
    distill_loss = jax.jit(lambda teacher: distill.loss(
        straight_apply, None, batch, ctx._replace(teacher=(teacher, None)))[1],
        static_argnums=0)
    assert float(distill_loss(straight_apply)["loss"]) < 1e-24
    # With the curved teacher, its one Euler step from the pseudo point misses T(z).
    metrics = distill_loss(teacher_apply)
    assert float(metrics["reflow"]) < 1e-24 and float(metrics["flow_guidance"]) > 1e-4
    with pytest.raises(TesseraxError, match="needs a teacher"):
      distill.loss(straight_apply, None, batch, ctx._replace(teacher=None))


def test_flow_guidance_regresses_onto_the_teachers_completion():
  """n - x_T for the pseudo point of the student's one-step velocity, by a NumPy transcription
  of teacher_loss_new in the official t = 0-noise time."""
  with jax.enable_x64(True):
    student = lambda params, x, t, labels: 0.5 * x - 0.2  # any one-step student
    labels = jnp.zeros(512, jnp.int32)
    ctx = Context(step=0, key=jax.random.PRNGKey(2), num_classes=1,
                  teacher=(teacher_apply, None))
    settings = _slimflow_config().objective
    got = jax.jit(lambda: slimflow.flow_guidance(student, None, labels, (512,) + SHAPE, ctx,
                                                 settings))()
    # The draws of objectives/slimflow.py's keys.
    key_n, key_s = jax.random.split(jax.random.fold_in(ctx.key, 3))
    noise = np.asarray(jax.random.normal(key_n, (512,) + SHAPE))
    s = np.asarray(jax.random.uniform(key_s, (512,), minval=0.2, maxval=0.8))[:, None, None,
                                                                             None]
    t_sit = 1 - s
    predicted = -(0.5 * noise - 0.2)  # data - noise
    x_pseudo = noise + t_sit * predicted
    v_teacher = -exact_velocity(x_pseudo, 1 - t_sit)
    x_1 = x_pseudo + (1 - t_sit) * v_teacher
    target = x_1 - noise
    expected = np.mean((predicted - target) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_a_slimflow_student_of_another_shape_than_the_pairs_is_refused_in_one_line():
  batch = _exact_pairs(8)
  ctx = Context(step=0, key=jax.random.PRNGKey(0), num_classes=1)
  for model in (dict(input_size=4, in_channels=1), dict(input_size=2, in_channels=3)):
    config = _slimflow_config()
    config.model.update(model)
    with pytest.raises(TesseraxError, match="^this SlimFlow student takes") as error:
      slimflow.make(config).loss(straight_apply, None, batch, ctx)
    assert "\n" not in str(error.value)


def test_a_flowturbo_refiner_trains_and_samples_with_its_teacher(tiny_teacher_workdir,
                                                                 digits_data_dir):
  from tesserax.sampling.guidance import guided_velocity
  from tesserax.tasks import diffusion
  config = config_lib.load("digits_flowturbo:tiny")
  config.data.data_dir = digits_data_dir
  config.teacher.workdir = tiny_teacher_workdir
  task = diffusion.DiffusionTask(config, sharding.local_mesh())
  state = task.init()
  batch = {"image": np.random.default_rng(0).uniform(-1, 1, (16, 16, 16, 1)).astype(np.float32),
           "label": np.arange(16, dtype=np.int32) % 10}
  _, metrics = task.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  # The zero-initialised refiner's offsets vanish: its samples are the step mix over the
  # teacher's guided velocity and a zero refiner, from the task's noise.
  settings = config.sample.copy_and_resolve_references()
  settings.update(num_steps=4, heun_steps=1, refine_steps=2, cfg_scale=1.5)
  labels = np.arange(4, dtype=np.int32)
  got = task.predict["generate"](task.init()["ema"], labels, jax.random.PRNGKey(0), settings)
  velocity, teacher_params = task.teacher
  noise = sharding.sharded_normal(jax.random.fold_in(jax.random.PRNGKey(0), 0), (4, 16, 16, 1),
                                  task.mesh)
  v = guided_velocity(lambda x, t, y: velocity(teacher_params, x, t, y), jnp.asarray(labels),
                      config.model.num_classes, 1.5)
  expected = flowturbo_sampler.flowturbo(v, lambda x, t, u: jnp.zeros_like(x), noise,
                                         np.linspace(1, 0, 5, dtype=np.float32), 1, 2)
  assert np.abs(np.asarray(expected)).max() > 0.1
  np.testing.assert_allclose(got, expected, atol=1e-4)
  settings.update(solver="euler")
  with pytest.raises(TesseraxError, match="^euler needs velocity; this model gives "
                                          "velocity_refiner"):
    task.predict["generate"](state["ema"], labels, jax.random.PRNGKey(0), settings)
