"""Masked-token cross-entropy of MaskGIT (Chang et al. 2022, §3.2) as TiTok trains its
generators (bytedance/1d-tokenizer: ImageBert.masking_input_tokens in modeling/maskgit.py,
MLMLoss in modeling/modules/losses.py, configs/training/generator/maskgit.yaml).

Masking: per example t ~ U(0, 1), mask ratio r = arccos(t) / (pi / 2) clipped to [1e-6, 1],
round(N r) tokens (at least one) replaced by [MASK] (id = codebook_size) at random positions.
Loss: cross-entropy with label smoothing eps over the codebook at every position,
  ce = -(1 - eps) log p(y) - eps / C * sum_c log p(c),
weighted 1 at masked and `unmasked_weight` at unmasked positions,
  loss = sum(w * ce) / (sum(w) + 1e-8) over the batch;
labels replaced by the null class with probability class_dropout (`class_label_dropout`).
The prediction kind is "token_logits": predict(params, tokens, labels) -> logits over the
codebook, what sampling/maskgit_decode.py consumes.
"""
import functools
import math

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.objectives.context import Objective
from tesserax.objectives.rectified_flow import drop_labels


def mask_tokens(key, tokens, mask_id):
  """(tokens with [MASK] at the masked positions, mask bool [B, N]) by the arccos schedule."""
  b, n = tokens.shape
  key_t, key_perm = jax.random.split(key)
  t = jax.random.uniform(key_t, (b,))
  ratio = jnp.clip(jnp.arccos(t) / (math.pi * 0.5), 1e-6, 1.0)
  num_masked = jnp.maximum(jnp.round(n * ratio), 1)
  order = jnp.argsort(jax.random.uniform(key_perm, (b, n)), axis=-1)
  mask = order < num_masked[:, None]
  return jnp.where(mask, mask_id, tokens), mask


def smoothed_cross_entropy(logits, targets, label_smoothing):
  """torch CrossEntropyLoss(label_smoothing) per position: logits [..., C], targets [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)


def token_logits(apply, params, tokens, labels):
  """Logits over the codebook at every position of `tokens` ([MASK] where unknown)."""
  return apply(params, tokens, labels)


def loss(apply, params, batch, ctx, *, label_smoothing, unmasked_weight, class_dropout,
         mask_id):
  """The weighted masked-token cross-entropy; metrics: loss, accuracy at masked positions."""
  tokens = batch["image"].reshape(batch["image"].shape[0], -1)
  key_mask, key_drop, key_dropout = jax.random.split(ctx.key, 3)
  masked, mask = mask_tokens(key_mask, tokens, mask_id)
  labels = drop_labels(key_drop, batch["label"], class_dropout, ctx.num_classes)
  logits = apply(params, masked, labels, train=True, key=key_dropout)
  ce = smoothed_cross_entropy(logits, tokens, label_smoothing)
  weights = jnp.where(mask, 1.0, unmasked_weight)
  value = jnp.sum(ce * weights) / (jnp.sum(weights) + 1e-8)
  correct = (jnp.argmax(logits, -1) == tokens) * mask
  accuracy = jnp.mean(correct.sum(1) / (mask.sum(1) + 1e-8))
  return value, {"loss": value, "masked_accuracy": accuracy}


@registry.OBJECTIVES.register("masked_tokens")
def make(config) -> Objective:
  """config.objective: label_smoothing (0.1), unmasked_weight (0.1); class dropout
  config.model.class_dropout; [MASK] = config.model.codebook_size."""
  o = config.objective
  return Objective(
      loss=functools.partial(loss, label_smoothing=o.get("label_smoothing", 0.1),
                             unmasked_weight=o.get("unmasked_weight", 0.1),
                             class_dropout=config.model.class_dropout,
                             mask_id=config.model.codebook_size),
      predictions={"token_logits": token_logits})
