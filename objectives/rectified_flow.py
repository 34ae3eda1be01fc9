"""Rectified flow / flow matching in tesserax's time convention (DESIGN.md).

x_t = (1 - t) x0 + t eps, t = 1 is noise, and the network regresses the velocity
v = eps - x0 (Liu et al. 2023; Lipman et al. 2023; the REPA/SD3 orientation).
Timesteps are logit-normal, t = sigmoid(N(mean, std)) (SD3 §3.1; LightningDiT "lognorm"),
or uniform. Labels are replaced by the null class with probability `class_dropout` so one
network serves classifier-free guidance (DiT LabelEmbedder.token_drop).

`objective.cosine_loss=True` adds LightningDiT's velocity-direction loss (transport/transport.py
`use_cosine_loss`): mean(1 - cos(v_pred, v)), the cosine taken
along channels at every position (torch cosine_similarity, eps 1e-8), with weight 1 next to the
MSE. Both velocities change sign between conventions, so the cosine is convention-free.
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Objective


def sample_time(key, batch_size, config):
  """Training timesteps in [0, 1]."""
  if config.time_sampling == "logit_normal":
    normal = jax.random.normal(key, (batch_size,))
    return jax.nn.sigmoid(config.logit_mean + config.logit_std * normal)
  if config.time_sampling == "uniform":
    return jax.random.uniform(key, (batch_size,))
  raise TesseraxError(f"unknown time_sampling {config.time_sampling!r}; use logit_normal or "
                      "uniform")


def drop_labels(key, labels, class_dropout, num_classes):
  """Replace each label by the null label `num_classes` with probability `class_dropout`."""
  if class_dropout <= 0:
    return labels
  drop = jax.random.uniform(key, labels.shape) < class_dropout
  return jnp.where(drop, num_classes, labels)


def velocity(apply, params, x, t, labels):
  """The velocity the network predicts (the first C channels of a learned-sigma output)."""
  return apply(params, x, t, labels)[..., :x.shape[-1]]


def cosine_similarity(a, b, eps=1e-8):
  """Cosine along the last (channel) axis, each norm clamped to eps as in torch (so a zero
  vector, e.g. the zero-initialised output, has finite gradients)."""
  norm = lambda v: jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(v), axis=-1), eps * eps))
  return jnp.sum(a * b, axis=-1) / (norm(a) * norm(b))


def loss(apply, params, batch, ctx, *, settings, class_dropout):
  """Mean squared velocity error (plus the optional cosine loss); returns (loss, metrics)."""
  x0, labels = batch["image"], batch["label"]
  key_t, key_eps, key_drop = jax.random.split(ctx.key, 3)
  t = sample_time(key_t, x0.shape[0], settings)
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
  tb = t[:, None, None, None]
  x_t = (1 - tb) * x0 + tb * eps
  labels = drop_labels(key_drop, labels, class_dropout, ctx.num_classes)
  pred = velocity(apply, params, x_t, t, labels)
  target = eps - x0
  mse = jnp.mean(jnp.square(pred - target))
  if not settings.get("cosine_loss", False):
    return mse, {"loss": mse}
  cosine = jnp.mean(1 - cosine_similarity(pred, target))
  return mse + cosine, {"loss": mse + cosine, "mse": mse, "cosine": cosine}


@registry.OBJECTIVES.register("rectified_flow")
def make(config) -> Objective:
  """config.objective: time_sampling, logit_mean, logit_std, [cosine_loss]; labels dropped
  with config.model.class_dropout."""
  return Objective(
      loss=functools.partial(loss, settings=config.objective,
                             class_dropout=config.model.class_dropout),
      predictions={"velocity": velocity})
