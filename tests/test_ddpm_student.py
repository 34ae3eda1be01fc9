"""A student starting from a DDPM (epsilon) teacher's weights (tasks/diffusion.py,
objective.parameterisation "epsilon"): the converted network is the teacher's exact EDM
denoiser, D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), k(sigma)), k(sigma) DDPM's step
interpolated in log sigma (k-diffusion's DiscreteEpsDDPMDenoiser)."""
import jax
import numpy as np
import pytest

from tesserax.core import config as config_lib, sharding
from tesserax.core.errors import TesseraxError
from tesserax.objectives import cd, edm
from tesserax.sampling import ddpm_sampler
from tesserax.tasks import diffusion
from tesserax.training import task as task_lib

pytestmark = [pytest.mark.xdist_group("ddpm_student"),  # one build of the session fixtures
              pytest.mark.long]


@pytest.fixture(scope="session")
def ddpm_teacher_workdir(tmp_path_factory, digits_data_dir):
  """digits_dit:tiny trained a few steps with DiT's DDPM objective (learned variance)."""
  from tesserax.training import loop
  config = config_lib.load("digits_dit:tiny")
  config.data.data_dir = digits_data_dir
  config.objective = dict(name="ddpm")
  config.model.learn_sigma = True
  config.optim.update(lr=1e-2, warmup_steps=0)  # moves the zero-initialised output layer
  workdir = str(tmp_path_factory.mktemp("ddpm_teacher"))
  loop.train(config, workdir, log=lambda *_: None)
  return workdir


def student_config(tiny_config, workdir, **objective):
  config = tiny_config.copy_and_resolve_references()
  config.model.learn_sigma = True
  config.teacher = dict(workdir=workdir, init_student=True)
  config.objective = cd.defaults(**objective)
  config.optim.warmup_steps = 0
  return config


def oracle_denoiser(epsilon, x, sigma):
  """float64 D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), k(sigma)) from the raw
  epsilon network `epsilon(x_k, steps)`."""
  ab = np.cumprod(1 - ddpm_sampler.linear_betas())
  table = np.sqrt((1 - ab) / ab)  # DDPM's sigmas, ascending in k
  steps = np.interp(np.log(sigma), np.log(table), np.arange(len(table)))
  scaled = x / np.sqrt(1 + sigma ** 2)[:, None, None, None]
  eps = np.asarray(epsilon(scaled.astype(np.float32), steps.astype(np.float32)), np.float64)
  return x - sigma[:, None, None, None] * eps[..., :x.shape[-1]]


def test_an_epsilon_student_is_its_ddpm_teachers_exact_denoiser(tiny_config,
                                                                 ddpm_teacher_workdir):
  teacher_task, teacher_state = task_lib.load_workdir(ddpm_teacher_workdir)
  task = diffusion.DiffusionTask(
      student_config(tiny_config, ddpm_teacher_workdir, parameterisation="epsilon"),
      sharding.local_mesh())
  state = task.init()
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(teacher_state["ema"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rng = np.random.default_rng(0)
  sigma = np.array([0.002, 0.05, 0.7, 3.0, 20.0, 80.0])  # 0.002 lies below DDPM's step 0
  x = rng.standard_normal((6, 16, 16, 1)) * np.sqrt(0.25 + sigma ** 2)[:, None, None, None]
  labels = np.arange(6, dtype=np.int32)
  ours = edm.denoiser_from_velocity(edm.network_velocity(task.apply, state["params"], labels))(
      x.astype(np.float32), sigma.astype(np.float32))
  epsilon = lambda x_k, steps: teacher_task.predictions()["epsilon"](
      teacher_state["ema"], x_k, steps, labels)
  expected = oracle_denoiser(epsilon, x, sigma)
  assert np.abs(expected - x).max() > 1e-2  # the teacher's epsilon is not zero
  error = np.abs(np.asarray(ours) - expected).max(axis=(1, 2, 3))
  np.testing.assert_array_less(error, 2e-5 * np.abs(expected).max(axis=(1, 2, 3)))
  batch = {"image": rng.standard_normal((8, 16, 16, 1)).astype(np.float32),
           "label": np.arange(8, dtype=np.int32)}
  new_state, metrics = task.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state["params"]),
                                                    jax.tree.leaves(teacher_state["ema"]))]
  assert any(moved)


def test_a_ddpm_teacher_needs_the_epsilon_parameterisation_to_start_a_student(
    tiny_config, ddpm_teacher_workdir):
  with pytest.raises(TesseraxError, match="predicts epsilon natively") as error:
    diffusion.DiffusionTask(student_config(tiny_config, ddpm_teacher_workdir),
                            sharding.local_mesh())
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("objective, model, match", [
    (dict(parameterisation="x0"), {}, "choose from velocity, epsilon"),
    (dict(parameterisation="epsilon"), dict(second_time=True), "no second time input"),
    (dict(name="ddpm", parameterisation="epsilon"), {}, "trains the epsilon network directly"),
])
def test_impossible_parameterisations_are_refused_in_one_line(tiny_config, ddpm_teacher_workdir,
                                                              objective, model, match):
  config = student_config(tiny_config, ddpm_teacher_workdir, **objective)
  config.model.update(model)
  with pytest.raises(TesseraxError, match=match) as error:
    diffusion.DiffusionTask(config, sharding.local_mesh())
  assert "\n" not in str(error.value)
