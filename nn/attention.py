"""Multi-head attention shared by every network: DiT/SiT/LightningDiT, DINOv2 and the LDM
autoencoder's AttnBlock.

`Attention` is timm's Attention (timm/models/vision_transformer.py), the block of DiT
models.py and DINOv2 layers/attention.py, with LightningDiT's QK-norm and 2D RoPE
(models/lightningdit.py), boolean or causal masks, and a KV cache for autoregressive decoding
(`decode`, a pure function of the cache). `dot_product_attention` is its functional core, which
single-head convolutional attention (LDM AttnBlock) calls directly.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tesserax.core import sharding
from tesserax.nn.layers import RMSNorm, apply_rope, linear, linear_view


class KVCache(NamedTuple):
  """Keys and values of the positions decoded so far, each [B, max_length, heads, head_dim].
  A pytree: the decoding loop carries it (jax.lax.scan / fori_loop) with the position."""
  key: jax.Array
  value: jax.Array


def _einsum_attention(q, k, v, mask, scale, precision):
  """softmax(q k^T * scale) v as two einsums with the softmax between them in the inputs'
  dtype; heads are folded into the batch so that one head is exactly the three-dimensional
  computation of LDM's AttnBlock."""
  b, tq, h, _ = q.shape
  fold = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], x.shape[3])
  logits = jnp.einsum("bqd,bkd->bqk", fold(q), fold(k), precision=precision) * scale
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, h, tq, k.shape[1])).reshape(logits.shape)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bqk,bkd->bqd", weights, fold(v), precision=precision)
  return out.reshape(b, h, tq, v.shape[3]).transpose(0, 2, 1, 3)


def _heads_major(x):
  """[B, T, heads, D] <-> [B, heads, T, D]."""
  return x.transpose(0, 2, 1, 3)


def _attention_weights(q, k, scale):
  """softmax(q k^T * scale) [B, heads, Tq, Tk] of head-major q, k, as
  `jax.nn.dot_product_attention` computes them (logits and softmax in at least float32, the
  weights in the inputs' dtype)."""
  logits = jnp.einsum("BNTH,BNSH->BNTS", q, k,
                      preferred_element_type=jnp.promote_types(q.dtype, jnp.float32)) * scale
  return jax.nn.softmax(logits, axis=-1).astype(q.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _softmax_attention(q, k, v, scale):
  """`jax.nn.dot_product_attention` unmasked, the same values, computed head-major and
  differentiated by hand. Head-major operands put the batched products' batch axes first, which
  XLA:CPU runs faster (DiT-S/2's attention at batch 8 on 2 cores: forward 13-14 -> 10-11 ms);
  the backward pass keeps the weights once, where differentiating the formula keeps them twice
  per scanned DiT block; forward-mode (MeanFlow's and sCM's JVPs) goes through the same rule."""
  q, k, v = _heads_major(q), _heads_major(k), _heads_major(v)
  return _heads_major(jnp.einsum("BNTS,BNSH->BNTH", _attention_weights(q, k, scale), v))


@_softmax_attention.defjvp
def _softmax_attention_jvp(scale, primals, tangents):
  (q, k, v), (dq, dk, dv) = [[_heads_major(x) for x in xs] for xs in (primals, tangents)]
  weights = _attention_weights(q, k, scale)
  dlogits = (jnp.einsum("BNTH,BNSH->BNTS", dq, k) + jnp.einsum("BNTH,BNSH->BNTS", q, dk)) * scale
  dweights = weights * (dlogits - jnp.sum(weights * dlogits, axis=-1, keepdims=True))
  out = jnp.einsum("BNTS,BNSH->BNTH", weights, v)
  tangent = jnp.einsum("BNTS,BNSH->BNTH", dweights, v) + jnp.einsum("BNTS,BNSH->BNTH", weights, dv)
  return _heads_major(out), _heads_major(tangent)


def dot_product_attention(q, k, v, mask=None, *, causal=False, scale=None, precision=None,
                          implementation=None):
  """softmax(q k^T * scale) v per head: q [B, Tq, H, D], k and v [B, Tk, H, D] -> [B, Tq, H, D].

  mask: boolean, broadcastable to [B, H, Tq, Tk], True where a query may attend. causal: query
  i attends keys j <= i (both counted from 0). scale: D ** -0.5 by default. precision: of both
  products (HIGHEST for evaluation networks).
  implementation:
    None, "xla", "cudnn": `jax.nn.dot_product_attention` (None is JAX's default, XLA today;
      "cudnn" is cuDNN's flash attention on GPU, for bfloat16/float16 inputs); the softmax
      runs in float32. None without mask, causality or precision is differentiated by
      `_softmax_attention`'s rule.
    "einsum": two einsums with the softmax between them in the inputs' dtype, LDM's AttnBlock
      computation (ldm/modules/diffusionmodules/model.py). The KL autoencoder keeps it: there
      it gives, bit for bit on CPU, the numbers of its original einsum implementation, which
      `jax.nn.dot_product_attention` does not (it orders the products differently and differs
      in the last bit, forward and backward).
  """
  if implementation == "einsum":
    tq, tk = q.shape[1], k.shape[1]
    if causal:
      tril = jnp.tril(jnp.ones((tq, tk), bool))
      mask = tril if mask is None else jnp.logical_and(mask, tril)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _einsum_attention(q, k, v, mask, scale, precision)
  if implementation is None and mask is None and not causal and precision is None:
    return _softmax_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
  attend = functools.partial(jax.nn.dot_product_attention, q, k, v, mask=mask, scale=scale,
                             is_causal=causal, implementation=implementation)
  if precision is None:
    return attend()
  with jax.default_matmul_precision(jax.lax.Precision(precision).name.lower()):
    return attend()


class Attention(nnx.Module):
  """timm Attention: a qkv projection, scaled dot-product attention per head, `proj`.

  fused_qkv: one Linear(dim, 3 dim) `qkv` whose output rows are [q | k | v], each split as
  (heads, head_dim) (timm, DiT, DINOv2); else separate `q`, `k`, `v` Linears. qk_norm: RMSNorm
  over head_dim on q and k (`q_norm`, `k_norm`; LightningDiT), before RoPE, whose (cos, sin)
  tables [T, head_dim] the caller passes. Linears are xavier-uniform with zero bias (DiT).
  logical_axes=False leaves the parameters without logical names (frozen evaluation networks);
  precision: of every matmul; implementation: see `dot_product_attention`.
  """

  def __init__(self, dim, num_heads, *, fused_qkv=True, qk_norm=False, precision=None,
               implementation=None, logical_axes=True, dtype=None, rngs):
    if dim % num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.fused_qkv = fused_qkv
    self.precision, self.implementation = precision, implementation
    names_in, names_out = (("embed", "heads"), ("heads", "embed")) if logical_axes else (None, None)
    dense = functools.partial(linear, dtype=dtype, precision=precision, rngs=rngs)
    if fused_qkv:
      self.qkv = dense(dim, 3 * dim, names_in)
    else:
      self.q, self.k, self.v = (dense(dim, dim, names_in) for _ in range(3))
    self.proj = dense(dim, dim, names_out)
    self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
    self.k_norm = RMSNorm(self.head_dim) if qk_norm else None

  def qkv_heads(self, x, rope=None):
    """q, k, v, each [B, T, heads, head_dim], after QK-norm and RoPE."""
    b, t, _ = x.shape
    if self.fused_qkv:
      qkv = linear_view(self.qkv, x, (3, self.num_heads, self.head_dim), (None, "heads", None))
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q, k, v = (f(x).reshape(b, t, self.num_heads, self.head_dim)
                 for f in (self.q, self.k, self.v))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return tuple(sharding.constrain(a, ("batch", None, "heads", None)) for a in (q, k, v))

  def __call__(self, x, *, rope=None, mask=None, causal=False):
    """x [B, T, dim] -> [B, T, dim]; mask and causal as `dot_product_attention` takes them."""
    b, t, _ = x.shape
    q, k, v = self.qkv_heads(x, rope)
    out = dot_product_attention(q, k, v, mask, causal=causal, precision=self.precision,
                                implementation=self.implementation)
    return self.proj(out.reshape(b, t, -1))

  def init_cache(self, batch, max_length, dtype=jnp.float32) -> KVCache:
    """An empty cache for `max_length` positions."""
    shape = (batch, max_length, self.num_heads, self.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def decode(self, x, cache: KVCache, position, *, rope=None):
    """Causal attention for the tokens x [B, T, dim] at positions position .. position + T - 1
    (T = 1 per decoding step, or a whole prompt to prefill), over the cache and themselves.

    Writes their keys and values into `cache` at `position` (an int, or traced in a loop) and
    returns (output [B, T, dim], the new cache). rope: (cos, sin) of these T positions.
    """
    b, t, _ = x.shape
    q, k, v = self.qkv_heads(x, rope)
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
        buf, new.astype(buf.dtype), position, axis=1)
    cache = KVCache(write(cache.key, k), write(cache.value, v))
    queries = position + jnp.arange(t)
    mask = jnp.arange(cache.key.shape[1])[None, :] <= queries[:, None]  # [T, max_length]
    out = dot_product_attention(q, cache.key.astype(q.dtype), cache.value.astype(q.dtype),
                                mask[None, None], precision=self.precision,
                                implementation=self.implementation)
    return self.proj(out.reshape(b, t, -1)), cache
