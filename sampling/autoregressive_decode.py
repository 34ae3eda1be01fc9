"""Autoregressive decoding of K token ids, one position per step of a `jax.lax.scan`, with a KV
cache (or, for comparison, recomputing the whole prefix each step), as LlamaGen samples
(FoundationVision/LlamaGen autoregressive/models/generate.py):

  logits of position p (classifier-free guidance: uncond + s (cond - uncond), the class and the
  null class as one doubled batch, both fed the same sampled token; s = 1 is one pass), divided
  by the temperature, top-k (keep the logits >= the k-th largest), top-p (keep the smallest set
  of most likely tokens whose probability reaches p: a token stays if the mass of the tokens
  ranked above it is < p), then a categorical draw with key fold_in(key, p).

Works for any token count K and codebook size. The model comes as a `CachedModel` (the task
binds its network to it).
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.sampling.sample import Sampler


class CachedModel(NamedTuple):
  """logits(params, tokens [B, K], labels) -> teacher-forced logits [B, K, V];
  init_cache(batch) -> an empty cache; step(params, prev [B, 1], labels, cache, position) ->
  (logits [B, 1, V] of `position` given the tokens before it, the cache with it written)."""
  logits: Callable
  init_cache: Callable
  step: Callable


def filter_logits(logits, top_k=0, top_p=1.0):
  """Logits outside the top-k / top-p sets (over the last axis) set to -inf; 0 and 1.0 keep
  all."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(before < top_p, ordered, jnp.inf).min(-1, keepdims=True)
    logits = jnp.where(logits >= kept, logits, -jnp.inf)
  return logits


def decode(model: CachedModel, params, labels, key, *, seq_len, null_label, temperature=1.0,
           top_k=0, top_p=1.0, cfg_scale=1.0, kv_cache=True):
  """(ids [B, K] int32, the guided logits of every position [B, K, V] before temperature and
  filtering). Traceable (jit it)."""
  b = labels.shape[0]
  guided = cfg_scale != 1.0
  run_labels = jnp.concatenate([labels, jnp.full_like(labels, null_label)]) if guided else labels
  rows = run_labels.shape[0]

  def guide(logits):
    logits = logits.astype(jnp.float32)
    return logits[b:] + cfg_scale * (logits[:b] - logits[b:]) if guided else logits

  def pick(logits, position):
    filtered = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(jax.random.fold_in(key, position), filtered).astype(jnp.int32)

  def cached_step(carry, position):
    prev, cache = carry
    logits, cache = model.step(params, prev, run_labels, cache, position)
    logits = guide(logits[:, 0])
    token = pick(logits, position)
    both = jnp.concatenate([token, token]) if guided else token
    return (both[:, None], cache), (token, logits)

  def full_step(ids, position):
    logits = guide(model.logits(params, ids, run_labels)[:, position])
    token = pick(logits, position)
    both = jnp.concatenate([token, token]) if guided else token
    return ids.at[:, position].set(both), (token, logits)

  positions = jnp.arange(seq_len)
  if kv_cache:
    init = (jnp.zeros((rows, 1), jnp.int32), model.init_cache(rows))
    _, (tokens, logits) = jax.lax.scan(cached_step, init, positions)
  else:
    _, (tokens, logits) = jax.lax.scan(full_step, jnp.zeros((rows, seq_len), jnp.int32),
                                       positions)
  return tokens.T, logits.transpose(1, 0, 2)


def make(model, settings, *, seq_len, codebook_size, null_label, mesh=None):
  """A jitted `sample(params, labels, key) -> ids [B, K]` for the settings (config.sample):
  temperature, top_k, top_p, cfg_scale, kv_cache (default True)."""
  del codebook_size, mesh
  if settings.get("temperature", 1.0) <= 0:
    raise TesseraxError(f"temperature {settings.temperature} must be positive")
  run = functools.partial(
      decode, model, seq_len=seq_len, null_label=null_label,
      temperature=settings.get("temperature", 1.0), top_k=settings.get("top_k", 0),
      top_p=settings.get("top_p", 1.0), cfg_scale=settings.get("cfg_scale", 1.0),
      kv_cache=settings.get("kv_cache", True))
  return jax.jit(lambda params, labels, key: run(params, labels, key)[0])


registry.SAMPLERS.register("autoregressive", Sampler("next_token_logits", make))
