"""Reflow (k-rectified flow; Liu, Gong, Liu, ICLR 2023, gnobitab/RectifiedFlow) and 2-rectified
flow++ (Lee, Lin, Fanti, NeurIPS 2024; sangyun884/rfpp train.py, t_dist.py).

Reflow trains a flow on the coupling of a trained flow instead of the independent one: each
example is a pair (noise z, teacher sample x = ODE_teacher(z)) from a pair cache
(data/pairs.py), served as batch {"noise", "image", "label"}. In tesserax's convention
z_t = (1 - t) x + t z, the target is v = z - x and x_hat = z_t - t v_theta(z_t, t). Training
k-RF is reflow on pairs made by a (k-1)-RF; the student usually starts from the teacher
(`teacher.init_student` of the diffusion task).

Timesteps (`objective.time_sampling`):
  uniform   t ~ U[0, 1] (gnobitab's rectified-flow loss; its t >= 1e-3 floor is immaterial);
  u_shaped  2-RF++'s p(t) ∝ exp(a t) + exp(a (1 - t)): a draw of p ∝ exp(a t) on [0, 1]
            reflected to 1 - t with probability 1/2 (t_dist.py concatenates t and 1 - t and
            shuffles), then mapped into [1e-5, 1 - 1e-5]; a = 4.
Losses (`objective.loss`), per example, averaged over the batch:
  mse          mean squared velocity error (gnobitab);
  huber        (sqrt(|v_theta - v|^2 + c^2) - c) / d with c = 0.00054 d, d = H W C (rfpp
               `huber`: note c grows with d itself, not with sqrt(d) as in iCT);
  lpips_huber  (1 - t) huber + D(x_hat, x) [/ t with `lpips_divt`] (rfpp `lpips-huber`, the
               2-RF++ premetric), D the context's frozen perceptual distance
               (`objective.perceptual`: "lpips", VGG LPIPS on images upsampled to 224 as rfpp
               does, or "digits_net", LPIPS's head-free form over the digits network, offline).
Labels are not dropped (rfpp).

A batch without "noise" (a plain image dataset) draws its pairs online from the frozen teacher
of the context: `online_steps` steps of `online_solver` ("euler", "heun") with guidance
`online_cfg_scale`, for the batch's labels; only the labels and the shape of "image" are used.
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Objective
from tesserax.objectives.rectified_flow import velocity
from tesserax.sampling.guidance import guided_velocity
from tesserax.sampling.solvers import SOLVERS
from tesserax.sampling.timesteps import time_grid

T_MIN, T_MAX = 1e-5, 1 - 1e-5  # rfpp t_dist.py


def _expand(a, x):
  return a.reshape((-1,) + (1,) * (x.ndim - 1))


def u_shaped_time(key, batch_size, a):
  """t with density ∝ exp(a t) + exp(a (1 - t)) on [1e-5, 1 - 1e-5] (rfpp t_dist.py)."""
  key_u, key_flip = jax.random.split(key)
  u = jax.random.uniform(key_u, (batch_size,))
  t = jnp.log1p(u * jnp.expm1(a)) / a  # inverse CDF of C exp(a t), C = a / (e^a - 1)
  t = jnp.where(jax.random.bernoulli(key_flip, 0.5, (batch_size,)), 1 - t, t)
  return t * (T_MAX - T_MIN) + T_MIN


def sample_time(key, batch_size, settings):
  if settings.time_sampling == "uniform":
    return jax.random.uniform(key, (batch_size,))
  if settings.time_sampling == "u_shaped":
    return u_shaped_time(key, batch_size, settings.u_shape_a)
  raise TesseraxError(f"unknown reflow time_sampling {settings.time_sampling!r}; use uniform "
                      "or u_shaped")


def pseudo_huber(pred, target):
  """(sqrt(|pred - target|^2 + c^2) - c) / d per example, c = 0.00054 d (rfpp train.py)."""
  d = pred[0].size
  c = 0.00054 * d
  sq = jnp.sum(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
  return (jnp.sqrt(sq + c * c) - c) / d


def online_pairs(ctx, labels, shape, settings):
  """(noise, teacher sample) drawn inside the step from the frozen teacher in `ctx`: its ODE
  over `online_steps` steps of `online_solver` with guidance `online_cfg_scale`
  (gnobitab's "online" reflow; shortcut-models' baselines/targets_livereflow.py)."""
  if ctx.teacher is None:
    raise TesseraxError("reflow without pairs in the batch needs a teacher (teacher.workdir) "
                        "or a pair cache")
  velocity_fn, teacher_params = ctx.teacher
  z = jax.random.normal(jax.random.fold_in(ctx.key, 1), shape)
  model_fn = lambda x, t, y: velocity_fn(teacher_params, x, t, y)
  guided = guided_velocity(model_fn, labels, ctx.num_classes, settings.online_cfg_scale)
  x = SOLVERS[settings.online_solver](guided, z, time_grid(settings.online_steps))
  return z, jax.lax.stop_gradient(x)


def loss(apply, params, batch, ctx, *, settings):
  labels = batch["label"]
  if "noise" in batch:
    x, z = batch["image"], batch["noise"]
  else:
    z, x = online_pairs(ctx, labels, batch["image"].shape, settings)
  t = sample_time(ctx.key, x.shape[0], settings)
  z_t = (1 - _expand(t, x)) * x + _expand(t, x) * z
  target = z - x
  pred = velocity(apply, params, z_t, t, labels)
  if settings.loss == "mse":
    per_example = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x.ndim)))
    total = jnp.mean(per_example)
    return total, {"loss": total}
  huber = pseudo_huber(pred, target)
  if settings.loss == "huber":
    total = jnp.mean(huber)
    return total, {"loss": total}
  x_hat = z_t - _expand(t, x) * pred
  perceptual = ctx.perceptual(x_hat, x)
  if settings.lpips_divt:
    perceptual = perceptual / t
  total = jnp.mean((1 - t) * huber + perceptual)
  return total, {"loss": total, "huber": jnp.mean(huber), "lpips": jnp.mean(perceptual)}


LOSSES = ("mse", "huber", "lpips_huber")


@registry.OBJECTIVES.register("reflow")
def make(config) -> Objective:
  """config.objective: time_sampling (uniform | u_shaped), u_shape_a, loss (mse | huber |
  lpips_huber), lpips_divt, perceptual (lpips_huber's network: lpips, digits_net);
  online_steps, online_solver, online_cfg_scale (pairs drawn from the teacher when the batch
  has none). The batch holds pairs: {"noise", "image", "label"}."""
  settings = config.objective
  if settings.loss not in LOSSES:
    raise TesseraxError(f"unknown reflow loss {settings.loss!r}; choose from {', '.join(LOSSES)}")
  if settings.loss == "lpips_huber" and not settings.get("perceptual"):
    raise TesseraxError("reflow loss lpips_huber needs a perceptual network: set "
                        "objective.perceptual (lpips, or digits_net offline)")
  return Objective(loss=functools.partial(loss, settings=settings),
                   predictions={"velocity": velocity})
