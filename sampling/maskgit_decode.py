"""MaskGIT's iterative parallel decoding (Chang et al. 2022, §3.2) as TiTok samples
(bytedance/1d-tokenizer modeling/maskgit.py ImageBert.generate, called by
sample_imagenet_titok.py with softmax_temperature_annealing=True).

From all N tokens masked, step s = 0..S-1 with ratio r = (s + 1) / S:
  1. logits of the guided model (below), divided by 0.5 + 0.8 (1 - r) when annealing;
  2. T = randomize_temperature * (1 - r); sampled ids = argmax(logits + T g), g Gumbel noise
     -log(-log(u)) with u ~ U[0, 1) clamped to 1e-20;
  3. confidence = the chosen (temperature-divided) logit + T g' with fresh noise g' (the logit,
     not its probability); already-fixed tokens keep their id and get +inf;
  4. n = floor(N arccos(r) / (pi / 2)) clamped to [1, #masked - 1]; tokens whose confidence is
     <= the n-th lowest are masked again (ties all re-masked); the last step keeps all. The
     clamp is per example (the official code uses the first example's count for the batch,
     the same number unless ties re-masked extra tokens).
Classifier-free guidance, two forward passes (the class and the null class) per step:
  "constant": logits = cond + g (cond - uncond) at every step (effective weight 1 + g);
  "linear":   as constant with g_s = g s / S (the first step unguided: one pass);
  "power-cosine" (MDT's schedule, TiTok S-128): logits = uncond + w_s (cond - uncond),
              w_s = (g - 1) (1 - cos(pi (s / S)^pow)) / 2 + 1, pow = guidance_scale_pow (3).
The per-step tables (re-mask counts, temperatures, guidance weights) are computed on the host in
float64, so the floors are exact; the loop is one `jax.lax.scan`, compiled once per shape.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.sampling.sample import Sampler

GUIDANCE = ("constant", "linear", "power-cosine")


class Schedule(NamedTuple):
  """Per-step host tables, each [S]: tokens left masked after the step, Gumbel temperature,
  logit divisor, guidance weight."""
  num_masked: np.ndarray
  temperature: np.ndarray
  logit_divisor: np.ndarray
  guidance: np.ndarray


def schedule(seq_len, num_steps, *, randomize_temperature, softmax_temperature_annealing=True,
             guidance="constant", guidance_scale=0.0, guidance_scale_pow=3.0) -> Schedule:
  """The tables of ImageBert.generate for N = seq_len tokens in S = num_steps steps. The
  re-mask count is before the [1, #masked - 1] clamp, which `decode` applies per example."""
  if guidance not in GUIDANCE:
    raise TesseraxError(f"unknown MaskGIT guidance {guidance!r}; choose from {', '.join(GUIDANCE)}")
  if num_steps < 1:
    raise TesseraxError(f"num_steps {num_steps} must be at least 1")
  steps = np.arange(num_steps, dtype=np.float64)
  ratio = (steps + 1) / num_steps
  num_masked = np.floor(seq_len * np.arccos(ratio) / (math.pi * 0.5)).astype(np.int32)
  divisor = 0.5 + 0.8 * (1 - ratio) if softmax_temperature_annealing else np.ones_like(ratio)
  if guidance == "constant":
    weight = np.full_like(ratio, guidance_scale)
  elif guidance == "linear":
    weight = guidance_scale * steps / num_steps
  else:
    weight = ((guidance_scale - 1) * (1 - np.cos((steps / num_steps) ** guidance_scale_pow
                                                 * math.pi)) / 2 + 1)
  return Schedule(num_masked, randomize_temperature * (1 - ratio), divisor, weight)


def guide(cond, uncond, weight, guidance):
  """The guided logits of one step: the convention of `guidance` with this step's weight."""
  if guidance == "power-cosine":
    return uncond + weight * (cond - uncond)
  return cond + weight * (cond - uncond)


def _gumbel(key, shape):
  u = jax.random.uniform(key, shape)
  return -jnp.log(jnp.maximum(-jnp.log(jnp.maximum(u, 1e-20)), 1e-20))


def decode(predict, params, labels, key, *, seq_len, mask_id, null_label, tables: Schedule,
           guidance="constant"):
  """(ids [B, N] int32, ids after each step [S, B, N]) of the MaskGIT sampler.

  predict(params, tokens [B, N], labels [B]) -> logits [B, N, codebook]; `mask_id` is the
  [MASK] id (= codebook size), `null_label` the unconditional label. Traceable (jit it)."""
  b = labels.shape[0]
  guided = bool(np.any(tables.guidance != 0)) or guidance == "power-cosine"
  null = jnp.full_like(labels, null_label)

  def step(ids, xs):
    s, num_masked, temperature, divisor, weight = xs
    is_mask = ids == mask_id
    if guided:
      both = predict(params, jnp.concatenate([ids, ids]), jnp.concatenate([labels, null]))
      logits = guide(both[:b], both[b:], weight, guidance)
    else:
      logits = predict(params, ids, labels)
    logits = logits.astype(jnp.float32) / divisor
    key_sample, key_conf = jax.random.split(jax.random.fold_in(key, s))
    sampled = jnp.argmax(logits + temperature * _gumbel(key_sample, logits.shape), axis=-1)
    chosen = jnp.take_along_axis(logits, sampled[..., None], axis=-1)[..., 0]
    sampled = jnp.where(is_mask, sampled, ids).astype(jnp.int32)
    chosen = jnp.where(is_mask, chosen, jnp.inf)
    count = jnp.clip(num_masked, 1, jnp.maximum(is_mask.sum(-1, keepdims=True) - 1, 1))
    confidence = chosen + temperature * _gumbel(key_conf, chosen.shape)
    cut_off = jnp.take_along_axis(jnp.sort(confidence, axis=-1), count - 1, axis=-1)
    last = s == tables.num_masked.shape[0] - 1
    ids = jnp.where(jnp.logical_and(confidence <= cut_off, ~last), mask_id, sampled)
    return ids, ids

  steps = np.arange(len(tables.num_masked))
  xs = (steps, tables.num_masked, tables.temperature.astype(np.float32),
        tables.logit_divisor.astype(np.float32), tables.guidance.astype(np.float32))
  ids0 = jnp.full((b, seq_len), mask_id, jnp.int32)
  return jax.lax.scan(step, ids0, xs)


def make(predict, settings, *, seq_len, codebook_size, null_label, mesh=None):
  """A jitted `sample(params, labels, key) -> ids [B, N]` for the settings (config.sample):
  num_steps, randomize_temperature, softmax_temperature_annealing, guidance,
  guidance_scale, guidance_scale_pow."""
  del mesh  # params and labels keep the sharding they arrive with
  guidance = settings.get("guidance", "constant")
  tables = schedule(seq_len, settings.num_steps,
                    randomize_temperature=settings.randomize_temperature,
                    softmax_temperature_annealing=settings.get("softmax_temperature_annealing",
                                                               True),
                    guidance=guidance, guidance_scale=settings.get("guidance_scale", 0.0),
                    guidance_scale_pow=settings.get("guidance_scale_pow", 3.0))
  run = functools.partial(decode, predict, seq_len=seq_len, mask_id=codebook_size,
                          null_label=null_label, tables=tables, guidance=guidance)
  return jax.jit(lambda params, labels, key: run(params, labels, key)[0])


registry.SAMPLERS.register("maskgit", Sampler("token_logits", make))
