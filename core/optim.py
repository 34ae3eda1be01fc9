"""Optimizer and EMA from the config.

AdamW with linear warm-up into a constant or cosine schedule and optional global-norm clipping.
DiT: lr 1e-4 constant, betas (0.9, 0.999), no weight decay, EMA 0.9999 initialised as a copy of
the parameters (DiT train.py). LightningDiT: lr 2e-4, betas (0.9, 0.95) (its configs/*.yaml).
"""
import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_config, num_steps: int):
  c = optim_config
  warmup = int(c.warmup_steps)
  if c.schedule == "constant":
    decay = optax.constant_schedule(c.lr)
  elif c.schedule == "cosine":
    decay = optax.cosine_decay_schedule(c.lr, max(num_steps - warmup, 1), alpha=c.end_lr_factor)
  else:
    raise ValueError(f"unknown schedule {c.schedule!r}; use constant or cosine")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), decay], [warmup])


def make_optimizer(optim_config, num_steps: int, mask=None) -> optax.GradientTransformation:
  """AdamW (after global-norm clipping where `grad_clip` > 0); `mask` (a pytree of bools or a
  function of the params giving one) selects the parameters weight decay applies to."""
  c = optim_config
  adamw = optax.adamw(learning_rate_schedule(c, num_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                      weight_decay=c.weight_decay, mask=mask)
  if c.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip), adamw)
  return adamw


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params, in the parameters' float32."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def global_norm(tree) -> jnp.ndarray:
  return optax.tree.norm(tree)
