"""SlimFlow: smaller one-step students with rectified flow (Zhu, Liu, Liu, ECCV 2024;
yuanzhi-zhu/SlimFlow reflow/reflow.py `RectifiedFlow`), in tesserax's time (t = 1 noise, the
student's velocity v = z - x; the official code runs t = 0 noise with v = x - z).

Two stages, each a run of this objective over pairs (noise z, teacher sample x) from a pair
cache (data/pairs.py; batch {"noise", "image", "label"}) or drawn online from the context's
teacher like reflow's (objectives/reflow.py `online_pairs`):

1. Annealing reflow. A student smaller than the teacher cannot start from the teacher's
   weights, so it starts from scratch (`teacher.init_student=False`, the official run without
   `pre_train_model`) and its coupling is annealed from independent noise, where reflow is
   plain flow matching on the teacher's samples, to the teacher's pairs:
     z <- sqrt(1 - beta^2) z + beta eps,   beta = max(0, 1 - step / anneal_steps)
   (`x0_randomness warmup_N`, linear; the official code has cos and exp schedules too), then
   the reflow loss at t ~ U[0, 1] on (z, x).
2. Flow-guided distillation. The student starts from the stage-1 student, which is also its
   teacher (`teacher.workdir` the stage-1 run, `teacher.init_student=True`), and trains at
   t = 1 only (one-step distillation on the pairs: the official `t0` schedule at t = eps) with
   `flow_guidance`, the regulariser `teacher_loss_new`: for fresh noise n, the student's
   one-step velocity v_hat = v(n, 1) places a pseudo point x_s = n - (1 - s) sg(v_hat) at
   s ~ U[0.2, 0.8]; one Euler step of the teacher completes it, x_T = x_s - s v_T(x_s, s), and
   v_hat regresses to n - x_T. The two terms are summed.
Losses (`loss`): mse, the squared velocity error averaged over pixels (`l2` with
reduce_mean); lpips, the perceptual distance of the implied samples z - v (the official LPIPS
at 64x64; here the context's frozen perceptual distance, `objective.perceptual` lpips or
digits_net offline), for both terms. `h_flip` flips noise and sample together horizontally with
probability 1/2 per example (the official flips the whole batch).

A student whose sample shape differs from the pairs' is refused in one line.
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Objective
from tesserax.objectives.rectified_flow import velocity
from tesserax.objectives.reflow import online_pairs

GUIDANCE_TIMES = (0.2, 0.8)  # reflow.py teacher_loss_new: t_ ~ U[0.2, 0.8]


def _expand(a, x):
  return a.reshape((-1,) + (1,) * (x.ndim - 1))


def anneal(step, anneal_steps):
  """beta of the annealed coupling: linear from 1 at step 0 to 0 at `anneal_steps`."""
  if anneal_steps <= 0:
    return jnp.zeros(())
  return jnp.clip((anneal_steps - jnp.asarray(step, jnp.float32)) / anneal_steps, 0.0, 1.0)


def _distance(settings, ctx, v_pred, v_target, z):
  """Per-example distance of a velocity to its target (mse) or of the samples z - v (lpips)."""
  if settings.loss == "mse":
    return jnp.mean(jnp.square(v_pred - v_target), axis=tuple(range(1, z.ndim)))
  return ctx.perceptual(z - v_pred, z - v_target)


def flow_guidance(apply, params, labels, shape, ctx, settings):
  """The flow-guided distillation term (`teacher_loss_new`), per example."""
  velocity_fn, teacher_params = ctx.teacher
  key_n, key_s = jax.random.split(jax.random.fold_in(ctx.key, 3))
  n = jax.random.normal(key_n, shape)
  v_hat = velocity(apply, params, n, jnp.ones(shape[:1]), labels)
  s = jax.random.uniform(key_s, shape[:1], minval=GUIDANCE_TIMES[0], maxval=GUIDANCE_TIMES[1])
  x_s = n - _expand(1 - s, n) * jax.lax.stop_gradient(v_hat)
  x_end = x_s - _expand(s, n) * velocity_fn(teacher_params, x_s, s, labels)
  return _distance(settings, ctx, v_hat, jax.lax.stop_gradient(n - x_end), n)


def loss(apply, params, batch, ctx, *, settings, student_shape):
  labels = batch["label"]
  pair_shape = tuple(batch["noise" if "noise" in batch else "image"].shape[1:])
  if pair_shape != student_shape:
    shapes = ["x".join(map(str, s)) for s in (student_shape, pair_shape)]
    raise TesseraxError(f"this SlimFlow student takes {shapes[0]} samples; the pairs are "
                        f"{shapes[1]}")
  if "noise" in batch:
    x, z = batch["image"], batch["noise"]
  else:
    z, x = online_pairs(ctx, labels, batch["image"].shape, settings)
  key_eps, key_t, key_flip = jax.random.split(ctx.key, 3)
  beta = anneal(ctx.step, settings.anneal_steps)
  z = jnp.sqrt(1 - beta ** 2) * z + beta * jax.random.normal(key_eps, z.shape)
  if settings.h_flip:
    flip = _expand(jax.random.bernoulli(key_flip, 0.5, labels.shape), x)
    x, z = (jnp.where(flip, a[:, :, ::-1], a) for a in (x, z))
  if settings.time_sampling == "uniform":
    t = jax.random.uniform(key_t, labels.shape)
  elif settings.time_sampling == "one_step":
    t = jnp.ones(labels.shape)
  else:
    raise TesseraxError(f"unknown slimflow time_sampling {settings.time_sampling!r}; use "
                        "uniform or one_step")
  z_t = (1 - _expand(t, x)) * x + _expand(t, x) * z
  pred = velocity(apply, params, z_t, t, labels)
  reflow_loss = jnp.mean(_distance(settings, ctx, pred, z - x, z))
  if not settings.flow_guidance:
    return reflow_loss, {"loss": reflow_loss, "beta": beta}
  if ctx.teacher is None:
    raise TesseraxError("slimflow's flow guidance needs a teacher (teacher.workdir)")
  guidance = jnp.mean(flow_guidance(apply, params, labels, x.shape, ctx, settings))
  total = reflow_loss + guidance
  return total, {"loss": total, "reflow": reflow_loss, "flow_guidance": guidance, "beta": beta}


LOSSES = ("mse", "lpips")


@registry.OBJECTIVES.register("slimflow")
def make(config) -> Objective:
  """config.objective: anneal_steps, time_sampling (uniform | one_step), loss (mse | lpips),
  perceptual (the lpips loss's network: lpips, digits_net), flow_guidance, h_flip;
  online_steps, online_solver, online_cfg_scale (pairs drawn from the teacher when the batch
  has none)."""
  settings = config.objective
  if settings.loss not in LOSSES:
    raise TesseraxError(f"unknown slimflow loss {settings.loss!r}; choose from "
                        f"{', '.join(LOSSES)}")
  if settings.loss == "lpips" and not settings.get("perceptual"):
    raise TesseraxError("slimflow loss lpips needs a perceptual network: set "
                        "objective.perceptual (lpips, or digits_net offline)")
  size = config.model.get("input_size", config.data.resolution)
  student_shape = (size, size, config.model.in_channels)
  return Objective(loss=functools.partial(loss, settings=settings,
                                          student_shape=student_shape),
                   predictions={"velocity": velocity})
