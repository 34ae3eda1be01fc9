"""FlowTurbo's velocity refiner (Zhao et al., NeurIPS 2024; shiml20/FlowTurbo
transport/transport.py `training_losses`, train.py, models_assemble.py).

The refiner r is a light network (the official one: the teacher's SiT at depth 1, its patch
embedding taking [x | u] along channels, 2C in, the first C of its output kept as the offset,
the learned-sigma chunk) that predicts how the frozen teacher's velocity changes over a short
step: from a point x_t on the data-noise path, u = v_T(x_t, t), one Euler step of the teacher
of size dt ~ U[0, 0.12] (one dt per batch) gives x' = x_t - dt u at t' = t - dt, and

  loss = mean |u + r([x' | u], t', y) - v_T(x', t', y)|^2,

with t ~ U[0, 1], the labels y of the refiner and of the teacher's second call dropped to the
null class together with probability `model.class_dropout` (the official `force_drop_ids`),
the first teacher call conditional. In the official t = 0-noise time t' = t + dt may pass 1
(data); here t' may fall below 0 likewise, and is left there.

The network is the diffusion task's (a DiT with `in_channels` twice the data's); the frozen
teacher comes from the context (`teacher.workdir`). Its prediction kind "velocity_refiner",
`refine(apply, params, xu, t, labels)` with xu = [x | u], is what sampling/flowturbo_sampler.py
consumes together with the teacher's velocity.
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Objective
from tesserax.objectives.rectified_flow import drop_labels


def refine(apply, params, xu, t, labels):
  """The refiner's velocity offset r from xu = [x | u] (the first C of its output channels)."""
  return apply(params, xu, t, labels)[..., :xu.shape[-1] // 2]


def _expand(a, x):
  return a.reshape((-1,) + (1,) * (x.ndim - 1))


def teacher_step(teacher, x_t, t, dt, labels, dropped):
  """(x', t', u, v_T(x', t')) of one teacher Euler step of size dt from (x_t, t): u =
  v_T(x_t, t) with `labels`, x' = x_t - dt u, t' = t - dt, the target with the `dropped`
  labels; `teacher(x, t, labels)` the frozen velocity."""
  u = teacher(x_t, t, labels)
  x_next, t_next = x_t - dt * u, t - dt
  return x_next, t_next, u, teacher(x_next, t_next, dropped)


def loss(apply, params, batch, ctx, *, max_dt, class_dropout, in_channels):
  x0, labels = batch["image"], batch["label"]
  if ctx.teacher is None:
    raise TesseraxError("objective flowturbo refines a teacher's velocity; set teacher.workdir")
  if in_channels != 2 * x0.shape[-1]:
    raise TesseraxError(f"a FlowTurbo refiner takes [x | v]: model.in_channels must be "
                        f"{2 * x0.shape[-1]} for {x0.shape[-1]}-channel data, got {in_channels}")
  velocity_fn, teacher_params = ctx.teacher
  key_t, key_eps, key_dt, key_drop = jax.random.split(ctx.key, 4)
  t = jax.random.uniform(key_t, labels.shape)
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
  x_t = (1 - _expand(t, x0)) * x0 + _expand(t, x0) * eps
  dt = jax.random.uniform(key_dt, (), maxval=max_dt)
  dropped = drop_labels(key_drop, labels, class_dropout, ctx.num_classes)
  teacher = lambda x, t, y: jax.lax.stop_gradient(velocity_fn(teacher_params, x, t, y))
  x_next, t_next, u, target = teacher_step(teacher, x_t, t, dt, labels, dropped)
  pred = u + refine(apply, params, jnp.concatenate([x_next, u], axis=-1), t_next, dropped)
  mse = jnp.mean(jnp.square(pred - target))
  return mse, {"loss": mse}


@registry.OBJECTIVES.register("flowturbo")
def make(config) -> Objective:
  """config.objective: max_dt (0.12 officially); labels dropped with model.class_dropout."""
  return Objective(
      loss=functools.partial(loss, max_dt=config.objective.max_dt,
                             class_dropout=config.model.class_dropout,
                             in_channels=config.model.in_channels),
      predictions={"velocity_refiner": refine})
