"""Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero, as in facebookresearch/DiT models.py.

Layout and quirks follow the official code exactly (reference/generators.md §1.3):
- norms: LayerNorm without affine, eps 1e-6; MLP: fc1 -> GELU(tanh) -> fc2, hidden 4D;
- attention: fused qkv Linear(D, 3D) with rows [q | k | v], each split as (heads, head_dim);
- conditioning c = t_emb + y_emb; t_emb from a 256-dim [cos, sin] sinusoid (max period 10000)
  through Linear -> SiLU -> Linear; label table of num_classes + 1 rows (null = num_classes);
- adaLN_modulation: SiLU -> Linear(D, 6D) -> (shift, scale, gate) for attention then MLP;
- final layer: LayerNorm -> modulate with Linear(D, 2D) -> Linear(D, p*p*out_channels), whose
  output index is (p_row, q_col, channel);
- fixed 2D sin-cos position embedding (each half [sin, cos], first half from the w coordinate),
  stored as a non-trainable buffer, outside the optimizer and EMA;
- init: xavier-uniform Linears (the fused qkv as one [3D, D] matrix) with zero biases, the patch
  conv xavier on its flattened [D, C*p*p] view, label table and both t-MLP weights N(0, 0.02),
  every adaLN output and the final linear zero.

The network takes flow time t in [0, 1] (t = 1 is noise, DESIGN.md) and embeds `t * time_scale`;
`time_scale = 1000` puts t on the scale of DiT's integer steps. Images are NHWC.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

# name: (depth, hidden_size, num_heads), from DiT models.py.
DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

TIME_FREQUENCY_DIM = 256


class Buffer(nnx.Variable):
  """A non-trainable array stored with the model (e.g. DiT's pos_embed)."""


def dit_config(name: str = "XL/2", **overrides) -> ml_collections.ConfigDict:
  """Model config for a named DiT size, e.g. "XL/2" or "S/8", with DiT's ImageNet defaults."""
  size, patch = name.split("/")
  if size not in DIT_SIZES:
    raise ValueError(f"unknown DiT size {size!r}; known: {sorted(DIT_SIZES)}")
  depth, hidden, heads = DIT_SIZES[size]
  config = ml_collections.ConfigDict(dict(
      name="dit", input_size=32, in_channels=4, patch_size=int(patch), hidden_size=hidden,
      depth=depth, num_heads=heads, mlp_ratio=4.0, num_classes=1000, class_dropout=0.1,
      learn_sigma=True, time_scale=1000.0, dtype="float32"))
  config.update(overrides)
  return config


def _xavier(in_axis=-2, out_axis=-1):
  return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis,
                                              out_axis=out_axis)


def _linear(din, dout, names, rngs, dtype, kernel_init=None, zero=False):
  """nnx.Linear with logical axis names on kernel and bias (zero=True: adaLN-Zero init)."""
  init = jax.nn.initializers.zeros if zero else (kernel_init or _xavier())
  return nnx.Linear(
      din, dout, dtype=dtype, rngs=rngs,
      kernel_init=nnx.with_partitioning(init, names),
      bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, (names[1],)))


def _at_least_f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _layer_norm(x, eps=1e-6):
  """LayerNorm without affine parameters, computed in (at least) float32."""
  x32 = _at_least_f32(x)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t, dim=TIME_FREQUENCY_DIM, max_period=10000.0):
  """[cos, sin] sinusoid of DiT's TimestepEmbedder.timestep_embedding (dim even)."""
  half = dim // 2
  t = _at_least_f32(t)
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
  args = t[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
  """DiT's get_2d_sincos_pos_embed: [grid_size**2, dim], float64 NumPy.

  `np.meshgrid(grid_w, grid_h)` makes grid[0] the w (column) coordinate; it fills the first
  dim/2 channels. Each 1D half is [sin, cos] of pos * 1/10000**(i/(dim/4)).
  """
  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  coords = np.arange(grid_size, dtype=np.float32)
  grid_w, grid_h = np.meshgrid(coords, coords)
  return np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)


class Attention(nnx.Module):
  """timm Attention with fused qkv and bias, through jax.nn.dot_product_attention."""

  def __init__(self, dim, num_heads, *, dtype, rngs):
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, ("embed", "heads"), rngs, dtype)
    self.proj = _linear(dim, dim, ("heads", "embed"), rngs, dtype)

  def __call__(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  """timm Mlp: fc1 -> GELU (tanh approximation) -> fc2."""

  def __init__(self, dim, hidden, *, dtype, rngs):
    self.fc1 = _linear(dim, hidden, ("embed", "mlp"), rngs, dtype)
    self.fc2 = _linear(hidden, dim, ("mlp", "embed"), rngs, dtype)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
  """x += gate_msa * attn(modulate(norm1(x))); x += gate_mlp * mlp(modulate(norm2(x)))."""

  def __init__(self, dim, num_heads, mlp_ratio, *, dtype, rngs):
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.adaLN_modulation = _linear(dim, 6 * dim, ("embed", "mlp"), rngs, dtype, zero=True)

  def __call__(self, x, c):
    mod = self.adaLN_modulation(jax.nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    x = x + gate_msa[:, None] * self.attn(_modulate(_layer_norm(x), shift_msa, scale_msa))
    x = x + gate_mlp[:, None] * self.mlp(_modulate(_layer_norm(x), shift_mlp, scale_mlp))
    return x


class TimestepEmbedder(nnx.Module):
  def __init__(self, dim, *, dtype, rngs):
    normal = jax.nn.initializers.normal(0.02)
    self.mlp_0 = _linear(TIME_FREQUENCY_DIM, dim, (None, "embed"), rngs, dtype, normal)
    self.mlp_2 = _linear(dim, dim, ("mlp", "embed"), rngs, dtype, normal)

  def __call__(self, t):
    return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_embedding(t))))


class FinalLayer(nnx.Module):
  def __init__(self, dim, patch_size, out_channels, *, dtype, rngs):
    self.adaLN_modulation = _linear(dim, 2 * dim, ("embed", "mlp"), rngs, dtype, zero=True)
    self.linear = _linear(dim, patch_size * patch_size * out_channels, ("embed", None), rngs,
                          dtype, zero=True)

  def __call__(self, x, c):
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
    return self.linear(_modulate(_layer_norm(x), shift, scale))


class DiT(nnx.Module):
  """DiT over NHWC inputs; `__call__(x, t, labels, train)` returns NHWC outputs with
  `out_channels` = 2 * in_channels when `learn_sigma`, else in_channels."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    if c.input_size % c.patch_size:
      raise ValueError(f"input_size {c.input_size} is not divisible by patch_size {c.patch_size}")
    if c.hidden_size % c.num_heads:
      raise ValueError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
    dtype = jnp.dtype(c.dtype)
    d = c.hidden_size
    self.patch_size = c.patch_size
    self.in_channels = c.in_channels
    self.out_channels = c.in_channels * (2 if c.learn_sigma else 1)
    self.num_classes = c.num_classes
    self.time_scale = float(c.time_scale)
    self.grid_size = c.input_size // c.patch_size
    self.x_embedder = nnx.Conv(
        c.in_channels, d, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
        dtype=dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(_xavier(in_axis=(0, 1, 2), out_axis=3),
                                          (None, None, "conv_in", "embed")),
        bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, ("embed",)))
    self.t_embedder = TimestepEmbedder(d, dtype=dtype, rngs=rngs)
    table_rows = c.num_classes + (1 if c.class_dropout > 0 else 0)
    self.y_embedder = nnx.Embed(
        table_rows, d, dtype=dtype, rngs=rngs,
        embedding_init=nnx.with_partitioning(jax.nn.initializers.normal(0.02), ("vocab", "embed")))
    self.pos_embed = Buffer(jnp.asarray(sincos_pos_embed_2d(d, self.grid_size), jnp.float32))
    self.blocks = nnx.List([DiTBlock(d, c.num_heads, c.mlp_ratio, dtype=dtype, rngs=rngs)
                            for _ in range(c.depth)])
    self.final_layer = FinalLayer(d, c.patch_size, self.out_channels, dtype=dtype, rngs=rngs)

  def unpatchify(self, x):
    """[B, h*w, p*p*C] with index (p_row, q_col, c) -> [B, h*p, w*p, C]."""
    b, p, g, ch = x.shape[0], self.patch_size, self.grid_size, self.out_channels
    x = x.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, ch)

  def __call__(self, x, t, labels, train: bool = False):
    """x: [B, H, W, C]; t: [B] flow time in [0, 1]; labels: [B] int32 (null = num_classes).

    `train` is part of the generator interface; DiT has no dropout, and label dropout for
    classifier-free guidance is the objective's job (it owns the random key).
    """
    del train
    h = self.x_embedder(x)
    h = h.reshape(h.shape[0], -1, h.shape[-1]) + self.pos_embed[...].astype(h.dtype)
    c = self.t_embedder(t * self.time_scale) + self.y_embedder(labels)
    for block in self.blocks:
      h = block(h, c)
    return _at_least_f32(self.unpatchify(self.final_layer(h, c)))


def count_params(config) -> int:
  """Number of parameters including the pos_embed buffer, as in the official state_dict."""
  model = nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))


def forward_flops(config) -> float:
  """Forward FLOPs per image (2 per multiply-accumulate), counted from the module shapes.

  DiT's "Gflops" are multiply-accumulates: XL/2 at 256px is 118.6 GMACs, i.e. ~237 GFLOP
  (reference/generators.md §1.2). A training step costs ~3x the forward pass without remat.
  """
  c = config
  d, p = c.hidden_size, c.patch_size
  tokens = (c.input_size // p) ** 2
  out_channels = c.in_channels * (2 if c.learn_sigma else 1)
  hidden = int(d * c.mlp_ratio)
  per_block = (tokens * (3 * d * d + d * d + 2 * d * hidden)   # qkv, proj, fc1 + fc2
               + 2 * tokens * tokens * d                      # q k^T and attention @ v
               + d * 6 * d)                                   # adaLN modulation
  macs = (tokens * p * p * c.in_channels * d                  # patch embedding
          + TIME_FREQUENCY_DIM * d + d * d                    # timestep MLP
          + c.depth * per_block
          + d * 2 * d + tokens * d * p * p * out_channels)    # final layer
  return 2.0 * macs
