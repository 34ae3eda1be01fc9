"""Layers shared by the networks: Linear with logical axis names, MLPs, norms, adaLN modulation,
time / label / position embeddings and 2D RoPE.

The formulas follow the official files they come from: DiT models.py (facebookresearch/DiT:
TimestepEmbedder, LabelEmbedder, modulate, get_2d_sincos_pos_embed), timm's Mlp, LightningDiT
(hustvl/LightningDiT models/swiglu_ffn.py, models/rmsnorm.py) and EVA-02's
VisionRotaryEmbeddingFast (baaivision/EVA, rope.py). Parameters carry logical axis names
(`embed`, `mlp`, `heads`, `vocab`, ...) that core/sharding.py maps onto the mesh.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tesserax.core import sharding

TIME_FREQUENCY_DIM = 256  # DiT's TimestepEmbedder frequency_embedding_size


class Buffer(nnx.Variable):
  """A non-trainable array stored with the model (DiT's pos_embed, RoPE tables): outside the
  optimizer and the EMA."""


def at_least_f32(x):
  """x in float32, or in its own dtype where that is wider (float64 tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dense(x, kernel, precision=None):
  """x [..., din] @ kernel [din, dout] as one 2D product over the flattened leading axes.

  The same forward pass as `jax.lax.dot_general`, but differentiated the weight gradient is a
  2D product x^T dy too; from the [..., din] form, XLA:CPU transposes every incoming gradient
  [B, T, dout] into [dout, B*T] for it, one copy per layer and step (the DiT-S/2 gradient
  spends about a tenth of its time there on 2 cores)."""
  x2 = x.reshape(-1, x.shape[-1])
  y = jax.lax.dot_general(x2, kernel, (((1,), (0,)), ((), ())), precision=precision)
  return y.reshape(x.shape[:-1] + kernel.shape[1:])


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **options):
  """`dense` in nnx.Linear's `dot_general` slot (which always contracts the last input axis
  with the kernel's first). nnx passes `out_sharding=None`; any option `linear` does not use
  (an output sharding, a preferred element type) is refused rather than dropped."""
  del dimension_numbers
  unsupported = {k: v for k, v in options.items() if v is not None}
  if unsupported:
    raise NotImplementedError(f"dense_dot_general does not take {sorted(unsupported)}")
  return dense(lhs, rhs, precision)


def linear(din, dout, axis_names=None, *, rngs, dtype=None, precision=None, kernel_init=None,
           zero_init=False):
  """nnx.Linear with a xavier-uniform kernel and zero bias (DiT's initialize_weights).

  axis_names: the kernel's logical names (in, out), the bias takes the second; None leaves the
  parameters without names (frozen evaluation networks). zero_init: zero kernel (adaLN-Zero,
  DiT §3.2).
  """
  if zero_init:
    kernel_init = jax.nn.initializers.zeros
  kernel_init = kernel_init or jax.nn.initializers.xavier_uniform()
  bias_init = jax.nn.initializers.zeros
  if axis_names is not None:
    kernel_init = nnx.with_partitioning(kernel_init, axis_names)
    bias_init = nnx.with_partitioning(bias_init, (axis_names[1],))
  return nnx.Linear(din, dout, dtype=dtype, precision=precision, kernel_init=kernel_init,
                    bias_init=bias_init, dot_general=dense_dot_general, rngs=rngs)


def linear_view(layer, x, shape, names):
  """`layer(x)` (an nnx.Linear) with its output features as `shape`, their layout under tensor
  parallelism the logical `names` (core/sharding.py `constrain`): the kernel is viewed as [din,
  *shape] before the product (the same product). A fused kernel whose columns hold parts side
  by side ([q | k | v], SwiGLU's [x1 | x2]) then splits over "tensor" part by part, where its
  columns split evenly would give the first devices all of the first part and all-gather the
  output to regroup it."""
  kernel = sharding.constrain(layer.kernel[...].reshape(-1, *shape), (None, *names))
  bias = layer.bias[...] if layer.bias is not None else None
  x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
  y = dense(x, kernel, layer.precision)
  return y if bias is None else y + bias.reshape(shape)


@jax.custom_jvp
def gelu_tanh(x):
  """GELU with the tanh approximation (`jax.nn.gelu(x, approximate=True)`) differentiated
  through its closed-form slope: the backward pass keeps one array where differentiating the
  formula keeps four [B, T, 4D] intermediates per scanned DiT block; forward-mode (the JVPs of
  MeanFlow and sCM) works as before."""
  return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  c = math.sqrt(2 / math.pi)
  tanh = jnp.tanh(c * (x + 0.044715 * x ** 3))
  slope = 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh * tanh) * c * (1 + 3 * 0.044715 * x * x)
  return gelu_tanh(x), slope * dx


class Mlp(nnx.Module):
  """timm Mlp: fc1 -> GELU -> fc2 (tanh approximation as DiT; exact erf as ViT/DINOv2)."""

  def __init__(self, dim, hidden, *, approximate_gelu=True, logical_axes=True, precision=None,
               dtype=None, rngs):
    names_in, names_out = (("embed", "mlp"), ("mlp", "embed")) if logical_axes else (None, None)
    self.approximate_gelu = approximate_gelu
    self.fc1 = linear(dim, hidden, names_in, dtype=dtype, precision=precision, rngs=rngs)
    self.fc2 = linear(hidden, dim, names_out, dtype=dtype, precision=precision, rngs=rngs)

  def __call__(self, x):
    h = sharding.constrain(self.fc1(x), ("batch",) + (None,) * (x.ndim - 2) + ("mlp",))
    return self.fc2(gelu_tanh(h) if self.approximate_gelu else jax.nn.gelu(h, approximate=False))


class SwiGLU(nnx.Module):
  """SwiGLUFFN (LightningDiT models/swiglu_ffn.py): w12 -> silu(x1) * x2 -> w3, with biases."""

  def __init__(self, dim, hidden, *, dtype=None, rngs):
    self.w12 = linear(dim, 2 * hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.w3 = linear(hidden, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x12 = linear_view(self.w12, x, (2, self.w3.in_features), (None, "mlp"))
    return self.w3(jax.nn.silu(x12[..., 0, :]) * x12[..., 1, :])


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm (LightningDiT models/rmsnorm.py): x * rsqrt(mean(x^2) + eps) in float32,
  cast back, times `scale` (the official `weight`, initialised to 1). axis_name: the logical
  name of `scale` (None for QK-norm over head_dim)."""

  def __init__(self, dim, axis_name=None, *, eps=1e-6):
    self.eps = eps
    init = nnx.with_partitioning(jax.nn.initializers.ones, (axis_name,))
    self.scale = nnx.Param(init(None, (dim,)))

  def __call__(self, x):
    x32 = at_least_f32(x)
    ms = jnp.square(x32).mean(-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(ms + self.eps)).astype(x.dtype) * self.scale[...].astype(x.dtype)


def layer_norm(x, eps=1e-6):
  """LayerNorm without affine parameters (DiT's elementwise_affine=False), computed in (at
  least) float32."""
  x32 = at_least_f32(x)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  """adaLN modulation of DiT models.py: x * (1 + scale) + shift, per sample over tokens."""
  return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t, dim=TIME_FREQUENCY_DIM, max_period=10000.0):
  """[cos, sin] sinusoid of DiT's TimestepEmbedder.timestep_embedding (dim even)."""
  half = dim // 2
  t = at_least_f32(t)
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
  args = t[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """DiT's TimestepEmbedder: the 256-dim sinusoid -> Linear -> SiLU -> Linear, weights
  N(0, 0.02). `mlp_0` / `mlp_2` are the official `mlp.0` / `mlp.2`."""

  def __init__(self, dim, *, dtype=None, rngs):
    normal = jax.nn.initializers.normal(0.02)
    self.mlp_0 = linear(TIME_FREQUENCY_DIM, dim, (None, "embed"), kernel_init=normal,
                        dtype=dtype, rngs=rngs)
    self.mlp_2 = linear(dim, dim, ("mlp", "embed"), kernel_init=normal, dtype=dtype, rngs=rngs)

  def __call__(self, t):
    return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_embedding(t))))


def label_embedding(num_classes, dim, *, null_class=True, dtype=None, rngs):
  """DiT's LabelEmbedder table: num_classes rows, plus the null (unconditional) class as row
  `num_classes` where `null_class` (classifier-free guidance), N(0, 0.02)."""
  init = nnx.with_partitioning(jax.nn.initializers.normal(0.02), ("vocab", "embed"))
  return nnx.Embed(num_classes + int(null_class), dim, dtype=dtype, embedding_init=init,
                   rngs=rngs)


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


def rope_tables(head_dim: int, grid_size: int, theta: float = 10000.0):
  """EVA-02 VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=grid_size), freqs_for='lang':
  (freqs_cos, freqs_sin), each [grid_size**2, head_dim], float64 NumPy.

  Per axis, frequencies 1/theta**(2i/(head_dim/2)) are each repeated for an interleaved pair;
  the first head_dim/2 channels take the row (h) index, the last the column (w) index, over
  row-major tokens (broadcat of freqs[:, None] and freqs[None, :]).
  """
  dim = head_dim // 2
  freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  axis = np.repeat(np.arange(grid_size, dtype=np.float64)[:, None] * freqs[None], 2, axis=1)
  shape = (grid_size, grid_size, dim)
  angles = np.concatenate([np.broadcast_to(axis[:, None], shape),
                           np.broadcast_to(axis[None, :], shape)], axis=-1)
  angles = angles.reshape(grid_size * grid_size, head_dim)
  return np.cos(angles), np.sin(angles)


class RotaryTables(nnx.Module):
  """The freqs_cos / freqs_sin buffers of EVA-02's VisionRotaryEmbeddingFast (2D RoPE)."""

  def __init__(self, head_dim, grid_size):
    cos, sin = rope_tables(head_dim, grid_size)
    self.freqs_cos = Buffer(jnp.asarray(cos, jnp.float32))
    self.freqs_sin = Buffer(jnp.asarray(sin, jnp.float32))

  def __call__(self):
    """(cos, sin), each [tokens, head_dim], as `apply_rope` takes them."""
    return self.freqs_cos[...], self.freqs_sin[...]


def apply_rope(x, cos, sin):
  """x * cos + rotate_half(x) * sin over [B, T, heads, head_dim] with cos, sin [T, head_dim],
  with EVA-02's interleaved rotate_half: each pair (x1, x2) -> (-x2, x1). Computed in (at
  least) float32."""
  x32 = at_least_f32(x)
  pairs = x32.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = x32 * cos[:, None].astype(x32.dtype) + rotated * sin[:, None].astype(x32.dtype)
  return out.astype(x.dtype)
