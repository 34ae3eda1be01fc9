"""A teacher in the objective context: a trained generator's velocity, frozen, and a student
initialised from its parameters (tasks/diffusion.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tesserax.core import registry, sharding
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Objective
from tesserax.tasks import diffusion
from tesserax.training import task as task_lib


def distill_loss(apply, params, batch, ctx):
  """Mean squared distance of the student's output to the teacher's velocity."""
  x, labels = batch["image"], batch["label"]
  t = jax.random.uniform(ctx.key, labels.shape)
  velocity, teacher_params = ctx.teacher
  target = velocity(teacher_params, x, t, labels)
  loss = jnp.mean((apply(params, x, t, labels) - target) ** 2)
  return loss, {"loss": loss}


registry.OBJECTIVES.register("test_distill", lambda config: Objective(distill_loss, {}))


def student_config(tiny_config, teacher_workdir, **model):
  config = tiny_config
  config.teacher = dict(workdir=teacher_workdir, init_student=True)
  config.objective = dict(name="test_distill")
  config.model.update(model)
  return config


def test_a_student_starting_from_its_teacher_has_zero_distillation_loss(tiny_config,
                                                                        tiny_teacher_workdir):
  _, teacher_state = task_lib.load_workdir(tiny_teacher_workdir)
  task = diffusion.DiffusionTask(student_config(tiny_config, tiny_teacher_workdir),
                                 sharding.local_mesh())
  state = task.init()
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(teacher_state["ema"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  batch = {"image": np.random.default_rng(0).normal(size=(16, 16, 16, 1)).astype(np.float32),
           "label": np.arange(16, dtype=np.int32) % 10}
  _, metrics = task.train_step(state, batch)
  assert float(metrics["loss"]) == 0.0
  fresh = student_config(tiny_config.copy_and_resolve_references(), tiny_teacher_workdir)
  fresh.teacher.init_student = False
  task = diffusion.DiffusionTask(fresh, sharding.local_mesh())
  state = task.init()
  t = jax.random.uniform(jax.random.fold_in(state["rng"], 0), (16,))
  teacher_task, _ = task_lib.load_workdir(tiny_teacher_workdir)
  velocity = teacher_task.predictions()["velocity"](teacher_state["ema"], batch["image"], t,
                                                    batch["label"])
  _, metrics = task.train_step(state, batch)
  # DiT's output layer starts at zero (adaLN-Zero), so the loss is the teacher's mean square.
  expected = float(np.mean(np.asarray(velocity, np.float64) ** 2))
  assert expected > 0
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_a_student_with_a_second_time_keeps_only_its_new_leaves_fresh(tiny_config,
                                                                      tiny_teacher_workdir):
  _, teacher_state = task_lib.load_workdir(tiny_teacher_workdir)
  config = student_config(tiny_config, tiny_teacher_workdir, second_time=True)
  task = diffusion.DiffusionTask(config, sharding.local_mesh())
  params = task.init()["params"]
  teacher = teacher_state["ema"]
  assert "s_embedder" in params and "s_embedder" not in teacher
  for key in teacher:
    for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(teacher[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_teacher_of_another_architecture_is_refused_in_one_line(tiny_config,
                                                                  tiny_teacher_workdir):
  config = student_config(tiny_config, tiny_teacher_workdir, hidden_size=64)
  with pytest.raises(TesseraxError, match="another architecture") as error:
    diffusion.DiffusionTask(config, sharding.local_mesh()).init()
  assert "\n" not in str(error.value)
