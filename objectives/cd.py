"""Consistency distillation (Song, Dhariwal, Chen, Sutskever 2023, Alg. 2; the JAX code
openai/consistency_models_cifar10 jcm/losses.py get_consistency_loss_fn).

On the ascending N-point Karras grid (rho = 7) pick n ~ U{0, ..., N - 2}, noise the data to the
upper level, x_{n+1} = x0 + sigma_{n+1} z, take one teacher step of the PF-ODE down to sigma_n
(Heun by default, or Euler) and compare

  d(f_theta(x_{n+1}, sigma_{n+1}), sg f_theta-(x_n_hat, sigma_n))

with uniform weighting. The teacher is the frozen flow model of `teacher.workdir` as an EDM
denoiser (objectives/edm.py); the target network theta- is the online network (the CIFAR-10
setting, mu = 0) or the trainer's EMA (`target="ema"`: ImageNet-64 uses a fixed 0.95 there).
The network has no dropout, so the two evaluations share it trivially. Published defaults
(CIFAR-10): N = 18, sigma in [0.002, 80], sigma_data 0.5, Heun. Metrics: l2, l1,
pseudo-Huber, and "perceptual", the paper's best (LPIPS): a frozen network the task puts in the
context (objectives/context.py).
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.objectives import edm
from tesserax.objectives.context import Objective


def distillation_distance(f_online, f_target, teacher_step, x0, z, sigma, sigma_next, distance):
  """Per-example distance(f_online(x0 + sigma_next z, sigma_next), sg f_target(x_hat, sigma)),
  where x_hat = teacher_step(x0 + sigma_next z, sigma_next, sigma)."""
  x_next = x0 + edm.per_example(sigma_next, x0) * z
  x_hat = jax.lax.stop_gradient(teacher_step(x_next, sigma_next, sigma))
  target = jax.lax.stop_gradient(f_target(x_hat, sigma))
  return distance(f_online(x_next, sigma_next), target)


def student(apply, params, labels, settings, *, train):
  """f(x, sigma) of the network at `params`."""
  velocity = edm.network_velocity(apply, params, labels, train=train)
  return edm.consistency_function(edm.denoiser_from_velocity(velocity), settings.sigma_min,
                                  settings.sigma_data)


def grid_pair(key, batch_size, num_scales, settings):
  """(sigma_n, sigma_{n+1}) [B] for n ~ U{0, ..., N - 2} on the Karras grid."""
  n = jax.random.randint(key, (batch_size,), 0, num_scales - 1).astype(jnp.float32)
  grid = functools.partial(edm.karras_sigmas, n=num_scales, sigma_min=settings.sigma_min,
                           sigma_max=settings.sigma_max, rho=settings.rho)
  return grid(n), grid(n + 1)


def loss(apply, params, batch, ctx, *, settings):
  x0, labels = batch["image"], batch["label"]
  key_n, key_z = jax.random.split(ctx.key)
  sigma, sigma_next = grid_pair(key_n, x0.shape[0], settings.num_scales, settings)
  z = jax.random.normal(key_z, x0.shape, x0.dtype)
  teacher = edm.denoiser_from_velocity(edm.teacher_velocity(ctx, labels))
  step = functools.partial(edm.TEACHER_STEPS[settings.teacher_solver], teacher)
  target = edm.target_params(params, ctx, settings.target)
  d = distillation_distance(student(apply, params, labels, settings, train=True),
                            student(apply, target, labels, settings, train=True), step, x0, z,
                            sigma, sigma_next,
                            edm.metric_distance(settings.metric, ctx, settings.get("huber_c")))
  total = jnp.mean(d)
  return total, {"loss": total}


def predictions(settings):
  return {"denoiser": functools.partial(edm.consistency_prediction, sigma_min=settings.sigma_min,
                                        sigma_data=settings.sigma_data)}


@registry.OBJECTIVES.register("cd")
def make(config) -> Objective:
  """config.objective: num_scales, sigma_min, sigma_max, rho, sigma_data, teacher_solver
  (heun, euler), metric (l2, l1, pseudo_huber), huber_c (None: 0.00054 sqrt(dim)), target
  (online, ema); config.teacher.workdir the flow model distilled. The metric "perceptual" is
  LPIPS (`objective.perceptual` "lpips": the paper's CD-LPIPS, images upsampled to 224
  bilinearly as jcm/losses.py does) or its digits stand-in ("digits_net"), given by the task."""
  s = config.objective
  edm.check_teacher(config, "cd")
  edm.check_choice("cd", "teacher_solver", s.teacher_solver, tuple(edm.TEACHER_STEPS))
  edm.check_metric(config, "cd")
  edm.check_choice("cd", "target", s.target, ("online", "ema"))
  return Objective(loss=functools.partial(loss, settings=s), predictions=predictions(s))


def defaults(**overrides):
  """The CIFAR-10 settings (launch.sh CD-l2), as a config.objective dict."""
  return dict(dict(name="cd", num_scales=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
              sigma_data=0.5, teacher_solver="heun", metric="l2", huber_c=None,
              target="online", perceptual=""), **overrides)
