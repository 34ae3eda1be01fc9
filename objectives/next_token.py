"""Next-token cross-entropy of a class-conditional autoregressive generator (LlamaGen, Sun et al.
2024 §2.2; FoundationVision/LlamaGen autoregressive/train/train_c2i.py): teacher-forced logits
of the K tokens, mean cross-entropy over every position and example, labels replaced by the null
class with probability class_dropout (LlamaGen class_dropout_prob 0.1).

The prediction kind is "next_token_logits": predict(params, tokens, labels) -> logits
[B, K, codebook] with position i predicting tokens[:, i]; sampling/autoregressive_decode.py
consumes it (with the network's KV-cache decoding, which the task adds).
"""
import functools

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.objectives.context import Objective
from tesserax.objectives.masked_tokens import smoothed_cross_entropy
from tesserax.objectives.rectified_flow import drop_labels


def next_token_logits(apply, params, tokens, labels):
  """Teacher-forced logits of every position."""
  return apply(params, tokens, labels)


def loss(apply, params, batch, ctx, *, class_dropout, label_smoothing):
  """Mean cross-entropy of the next token; metrics: loss, token accuracy."""
  tokens = batch["image"].reshape(batch["image"].shape[0], -1)
  key_drop, key_dropout = jax.random.split(ctx.key)
  labels = drop_labels(key_drop, batch["label"], class_dropout, ctx.num_classes)
  logits = apply(params, tokens, labels, train=True, key=key_dropout)
  value = jnp.mean(smoothed_cross_entropy(logits, tokens, label_smoothing))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == tokens)
  return value, {"loss": value, "accuracy": accuracy}


@registry.OBJECTIVES.register("next_token")
def make(config) -> Objective:
  """config.objective: [label_smoothing] (0: LlamaGen's plain cross-entropy); class dropout
  config.model.class_dropout."""
  return Objective(
      loss=functools.partial(loss, class_dropout=config.model.class_dropout,
                             label_smoothing=config.objective.get("label_smoothing", 0.0)),
      predictions={"next_token_logits": next_token_logits})
