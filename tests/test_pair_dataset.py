"""Pair caches as a training dataset: `tesserax pairs` (tasks/diffusion.py `write_pairs`),
dataset `pairs` of data/pipeline.py, and the diffusion task's check that its teacher made them.

Oracles: the cache written by the command against data/pairs.generate over the teacher's own
velocity and sampling/solvers.py Heun (a second batch size); the served batches against
pairs.load through the pipeline's documented epoch order and flips; the training step's loss
against objectives/reflow.py evaluated on the same batch.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tesserax import cli
from tesserax.core import config as config_lib, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.data import pairs, pipeline
from tesserax.objectives.context import Context
from tesserax.sampling import solvers, timesteps
from tesserax.tasks import diffusion

pytestmark = pytest.mark.xdist_group("pair_dataset")  # one teacher and cache per worker
NUM_PAIRS = 40
STEPS = 2  # digits_reflow:tiny's online_steps: the pair solver its runs check a cache against


@pytest.fixture(scope="session")
def pair_cache(tiny_teacher_workdir, tmp_path_factory):
  """A cache of the tiny teacher written by `tesserax pairs` (Heun, 2 steps)."""
  out = str(tmp_path_factory.mktemp("pair_dataset") / "pairs")
  assert cli.main(["pairs", "--workdir", tiny_teacher_workdir, "--out", out, "--num",
                   str(NUM_PAIRS), "--solver", "heun", "--steps", str(STEPS), "--seed", "3",
                   "--batch_size", "16"]) == 0
  return out


def _data(cache_dir, **overrides):
  return ml_collections.ConfigDict(dict(dict(
      name="pairs", data_dir=cache_dir, manual_dir="", resolution=16, split="train",
      random_flip=False, num_classes=10), **overrides))


def _reflow_config(teacher, cache_dir):
  config = config_lib.load("digits_reflow:tiny")
  config.teacher.workdir = teacher
  config.data.update(name="pairs", data_dir=cache_dir)
  return config


def _one_line(fn, match):
  with pytest.raises(TesseraxError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_the_pairs_command_writes_what_pairs_generate_writes(pair_cache, tiny_teacher_workdir,
                                                             tmp_path, capsys):
  from tesserax.training import task as task_lib
  task, state = task_lib.load_workdir(tiny_teacher_workdir)
  velocity = task.predictions()["velocity"]

  def heun(noise, labels):
    v = lambda x, t: velocity(state["ema"], x, jnp.full(x.shape[:1], t), labels)
    return solvers.heun(v, noise, timesteps.time_grid(STEPS))

  maker = {"workdir": os.path.abspath(tiny_teacher_workdir), "step": 4, "solver": "heun",
           "num_steps": STEPS, "cfg_scale": 1.0}
  direct = pairs.generate(jax.jit(heun), str(tmp_path / "direct"), maker=maker,
                          shape=(16, 16, 1), num_classes=10, num_pairs=NUM_PAIRS, seed=3,
                          batch_size=7, log=lambda *_: None)
  assert pairs.read_info(pair_cache) == pairs.read_info(direct)
  written, expected = pairs.load(pair_cache), pairs.load(direct)
  for k in ("noise", "label", "index"):
    np.testing.assert_array_equal(written[k], expected[k])
  np.testing.assert_allclose(written["image"], expected["image"], rtol=0, atol=1e-5)
  assert np.abs(written["image"] - written["noise"]).mean() > 1e-3  # the teacher moved them

  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.main(["pairs", "--help"])
  assert e.value.code == 0
  assert "--config.data.name=pairs" in capsys.readouterr().out
  assert cli.main(["pairs", "--workdir", tiny_teacher_workdir, "--out", str(tmp_path / "x"),
                   "--num", "0"]) == 2
  assert capsys.readouterr().err == "error: --num must be positive, got 0\n"


def test_the_pipeline_serves_exactly_the_cache_pairs(pair_cache):
  stored = pairs.load(pair_cache)
  images, labels = pipeline.load_split(_data(pair_cache), "train")
  np.testing.assert_array_equal(images, stored["image"])
  np.testing.assert_array_equal(labels, stored["label"])

  # Epoch 0 in the documented order, split by process; the loader's state resumes it.
  rng = np.random.default_rng([11, 0])
  order, flips = rng.permutation(NUM_PAIRS), rng.random(NUM_PAIRS) < 0.5
  loader = pipeline.make_train_loader(_data(pair_cache), 8, seed=11)
  served = [next(loader) for _ in range(3)]
  resumed = pipeline.make_train_loader(_data(pair_cache), 8, seed=11)
  resumed.set_state(loader.get_state())
  served += [next(resumed) for _ in range(2)]
  assert all(set(b) == {"noise", "image", "label"} for b in served)
  for k in ("noise", "image", "label"):
    np.testing.assert_array_equal(np.concatenate([b[k] for b in served]), stored[k][order])
  halves = [next(pipeline.make_train_loader(_data(pair_cache), 8, seed=11, process_index=p,
                                            process_count=2)) for p in (0, 1)]
  for k in ("noise", "image", "label"):
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), served[0][k])

  # random_flip mirrors noise and sample together.
  flipped = next(pipeline.make_train_loader(_data(pair_cache, random_flip=True), NUM_PAIRS,
                                            seed=11))
  for k in ("noise", "image"):
    expected = np.where(flips[:, None, None, None], stored[k][order][:, :, ::-1],
                        stored[k][order])
    np.testing.assert_array_equal(flipped[k], expected)
  assert 0 < flips.sum() < NUM_PAIRS


def test_a_reflow_step_trains_on_the_cache_pairs(pair_cache, tiny_teacher_workdir):
  config = _reflow_config(tiny_teacher_workdir, pair_cache)
  mesh = sharding.local_mesh()
  task = diffusion.DiffusionTask(config, mesh)
  loader = pipeline.make_train_loader(config.data, config.batch_size, config.seed)
  batch = sharding.global_batch(next(loader), mesh)
  state = task.init()
  ctx = Context(step=state["step"], key=train_state.step_key(state), num_classes=10,
                ema=state["ema"])  # no teacher: the loss must use the batch's pairs
  expected, _ = jax.jit(lambda p, b: task.objective.loss(task.apply, p, b, ctx))(
      state["params"], batch)
  shuffled = dict(batch, noise=batch["noise"][::-1])
  other, _ = jax.jit(lambda p, b: task.objective.loss(task.apply, p, b, ctx))(
      state["params"], shuffled)
  assert abs(float(other) - float(expected)) > 1e-3 * abs(float(expected))
  state, metrics = task.train_step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
  assert int(state["step"]) == 1


def test_a_cache_of_another_teacher_solver_or_shape_is_refused_in_one_line(
    pair_cache, tiny_teacher_workdir, tmp_path):
  teacher = os.path.abspath(tiny_teacher_workdir)
  build = lambda config: diffusion.DiffusionTask(config, sharding.local_mesh())
  other = pairs.generate(lambda noise, labels: 0.5 * noise, str(tmp_path / "other"),
                         maker=diffusion.pair_maker("/elsewhere/teacher", 4, "heun", STEPS, 1.0),
                         shape=(16, 16, 1), num_classes=10, num_pairs=8, log=lambda *_: None)
  message = _one_line(lambda: build(_reflow_config(tiny_teacher_workdir, other)),
                      "^pair cache .* was made by .*; this run needs ")
  assert "workdir /elsewhere/teacher" in message and f"workdir {teacher}" in message

  config = _reflow_config(tiny_teacher_workdir, pair_cache)
  config.objective.online_steps = 4
  _one_line(lambda: build(config), "num_steps 2, solver heun, step 4, workdir .* at 16x16x1; "
                                   "this run needs .*num_steps 4, ")
  config = _reflow_config(tiny_teacher_workdir, pair_cache)
  config.data.resolution = 8
  _one_line(lambda: build(config), "at 16x16x1; this run needs .* at 8x8x1$")
  _one_line(lambda: pipeline.make_train_loader(config.data, 16, 0),
            r"holds samples of shape \[16, 16, 1\]; set data.resolution=16$")
  config = _reflow_config("", pair_cache)  # no teacher: the shape is still checked
  config.teacher.init_student = False
  config.model.in_channels = 3
  _one_line(lambda: build(config), "holds 16x16x1 samples; this run needs 16x16x3$")
  _one_line(lambda: pipeline.make_train_loader(_data(str(tmp_path)), 8, 0), "tesserax pairs")
  _one_line(lambda: pipeline.build("pairs", str(tmp_path)), "tesserax pairs")


def test_pairs_of_another_model_than_the_teacher_are_named_by_pairs_workdir(
    pair_cache, tiny_teacher_workdir, tmp_path):
  """SlimFlow's distillation stage: flow guidance from one model (here a copy of the teacher
  in another workdir), pairs from another (`teacher.pairs_workdir`)."""
  import shutil
  guide = shutil.copytree(tiny_teacher_workdir, tmp_path / "stage1")
  build = lambda config: diffusion.DiffusionTask(config, sharding.local_mesh())
  config = _reflow_config(str(guide), pair_cache)
  _one_line(lambda: build(config), f"^pair cache .* was made by .*workdir "
                                   f"{os.path.abspath(tiny_teacher_workdir)}.*; this run needs "
                                   f".*workdir {guide}")
  config.teacher.pairs_workdir = tiny_teacher_workdir
  assert build(config).teacher is not None
  config.teacher.pairs_workdir = str(tmp_path / "missing")
  _one_line(lambda: build(config), "not a training workdir")
