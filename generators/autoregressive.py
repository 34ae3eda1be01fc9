"""A class-conditional decoder-only transformer over 1D token ids, LlamaGen-style (Sun et al.
2024, "Autoregressive Model Beats Diffusion", §2.2; FoundationVision/LlamaGen
autoregressive/models/gpt.py): the class embedding is the first token, then pre-norm blocks of
RMSNorm (eps 1e-5) -> causal attention with 1D RoPE -> residual, RMSNorm -> SwiGLU ->
residual, a final RMSNorm and a Linear head over the codebook.

For K tokens the input is [class, x_0, ..., x_{K-2}] at positions 0..K-1 and the logits at
position i predict x_i. RoPE rotates interleaved pairs of each head (the complex view of
LlamaGen's apply_rotary_emb) by angle position * theta^(-2j/head_dim), theta 10000, over all K
positions, the class token's included. Labels are tesserax's (null = num_classes, a row of the
class table, for classifier-free guidance). Weights N(0, 0.02), the head zero (LlamaGen
initialize_weights).

Built from nn/'s Attention (fused qkv; its Linears have biases, unlike LlamaGen's), SwiGLU
(w12 / w3 with biases) and RMSNorm; hidden width int(8d/3) rounded up to a multiple of 256 unless
`mlp_hidden` is given. `decode` runs one position against a KV cache (nn/attention.py
`Attention.decode`), which sampling/autoregressive_decode.py carries through its loop.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tesserax.core import registry
from tesserax.generators.maskgit import check_token_ids, reinit_linears
from tesserax.nn import layers
from tesserax.nn.attention import Attention


def ar_config(**overrides) -> ml_collections.ConfigDict:
  """A model config (LlamaGen-B's width and depth by default: 768, 12 layers, 12 heads)."""
  config = ml_collections.ConfigDict(dict(
      name="autoregressive", codebook_size=4096, num_classes=1000, seq_len=32,
      hidden_size=768, depth=12, num_heads=12, mlp_hidden=0, rope_theta=10000.0,
      class_dropout=0.1, dtype="float32"))
  config.update(overrides)
  return config


def mlp_hidden(config) -> int:
  """LlamaGen's FeedForward width: find_multiple(int(2 * 4d / 3), 256), or config.mlp_hidden."""
  if config.get("mlp_hidden", 0):
    return config.mlp_hidden
  hidden = int(2 * 4 * config.hidden_size / 3)
  return -(-hidden // 256) * 256


def rope_1d(head_dim, length, theta=10000.0):
  """(cos, sin) [length, head_dim] float64: angle p * theta^(-2j/head_dim) for pair j,
  repeated over the interleaved pair as nn/layers.apply_rope takes it."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  angles = np.repeat(np.arange(length, dtype=np.float64)[:, None] * freqs[None], 2, axis=1)
  return np.cos(angles), np.sin(angles)


class Block(nnx.Module):
  """x += attention(attention_norm(x)); x += feed_forward(ffn_norm(x))."""

  def __init__(self, dim, heads, hidden, *, dtype, rngs):
    self.attention_norm = layers.RMSNorm(dim, "embed", eps=1e-5)
    self.attention = Attention(dim, heads, dtype=dtype, rngs=rngs)
    self.ffn_norm = layers.RMSNorm(dim, "embed", eps=1e-5)
    self.feed_forward = layers.SwiGLU(dim, hidden, dtype=dtype, rngs=rngs)

  def __call__(self, x, rope):
    x = x + self.attention(self.attention_norm(x), rope=rope, causal=True)
    return x + self.feed_forward(self.ffn_norm(x))

  def decode(self, x, rope, cache, position):
    h, cache = self.attention.decode(self.attention_norm(x), cache, position, rope=rope)
    x = x + h
    return x + self.feed_forward(self.ffn_norm(x)), cache


class AutoregressiveTransformer(nnx.Module):
  """`__call__(tokens, labels)` -> teacher-forced logits; `init_cache` + `decode` for sampling."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.dtype)
    normal = jax.nn.initializers.normal(0.02)
    self.codebook_size, self.num_classes, self.seq_len = c.codebook_size, c.num_classes, c.seq_len
    self.dtype = dtype
    d = c.hidden_size
    self.tok_embeddings = nnx.Embed(c.codebook_size, d, dtype=dtype, rngs=rngs,
                                    embedding_init=nnx.with_partitioning(normal,
                                                                         ("vocab", "embed")))
    self.cls_embedding = layers.label_embedding(c.num_classes, d, dtype=dtype, rngs=rngs)
    cos, sin = rope_1d(d // c.num_heads, c.seq_len, c.get("rope_theta", 10000.0))
    self.freqs_cos = layers.Buffer(jnp.asarray(cos, jnp.float32))
    self.freqs_sin = layers.Buffer(jnp.asarray(sin, jnp.float32))
    self.layers = nnx.List([Block(d, c.num_heads, mlp_hidden(c), dtype=dtype, rngs=rngs)
                            for _ in range(c.depth)])
    self.norm = layers.RMSNorm(d, "embed", eps=1e-5)
    self.output = layers.linear(d, c.codebook_size, ("embed", "vocab"), zero_init=True,
                                dtype=dtype, rngs=rngs)
    reinit_linears(self.layers, normal, rngs.params())

  def __call__(self, tokens, labels, train: bool = False, key=None):
    """tokens [B, K] int32 in [0, codebook); labels [B] (null = num_classes) -> logits
    [B, K, codebook] float32, position i predicting tokens[:, i] from the class and
    tokens[:, :i]. No dropout: `train` and `key` change nothing."""
    del train, key
    check_token_ids(tokens, self.codebook_size, allow_mask=False)
    x = jnp.concatenate([self.cls_embedding(labels)[:, None],
                         self.tok_embeddings(tokens[:, :-1])], axis=1)
    k = x.shape[1]
    rope = (self.freqs_cos[...][:k], self.freqs_sin[...][:k])
    for block in self.layers:
      x = block(x, rope)
    return layers.at_least_f32(self.output(self.norm(x)))

  def init_cache(self, batch):
    """An empty KV cache per block for seq_len positions."""
    return tuple(block.attention.init_cache(batch, self.seq_len, self.dtype)
                 for block in self.layers)

  def decode(self, prev, labels, cache, position):
    """Logits [B, 1, codebook] for position `position` (traced int) given the token at
    position - 1 (`prev` [B, 1]; ignored at position 0, where the class token goes in) and
    the cache of positions < position; returns (logits, new cache)."""
    x = jnp.where(position == 0, self.cls_embedding(labels)[:, None],
                  self.tok_embeddings(prev))
    rope = tuple(jax.lax.dynamic_slice_in_dim(t[...], position, 1) for t in
                 (self.freqs_cos, self.freqs_sin))
    new_cache = []
    for block, layer_cache in zip(self.layers, cache):
      x, layer_cache = block.decode(x, rope, layer_cache, position)
      new_cache.append(layer_cache)
    return layers.at_least_f32(self.output(self.norm(x))), tuple(new_cache)


registry.NETWORKS.register("autoregressive", AutoregressiveTransformer)
