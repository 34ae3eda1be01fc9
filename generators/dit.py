"""The DiT family: DiT (Peebles & Xie 2023), SiT and LightningDiT as one configurable network.

DiT's layout and quirks follow facebookresearch/DiT models.py exactly; the shared layers
(attention, MLPs, norms, embeddings, RoPE) are nn/'s:
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

SiT (willisma/SiT models.py) is this network unchanged, trained on the linear path.
LightningDiT (hustvl/LightningDiT models/lightningdit.py) adds, each a config switch:
- `mlp="swiglu"`: SwiGLUFFN, w12 = Linear(D, 2H) -> silu(x1) * x2 -> w3 = Linear(H, D), with
  biases, H = int(2/3 * int(mlp_ratio * D)) (3072 for XL: the GELU MLP's parameters and MACs);
- `norm="rmsnorm"`: RMSNorm x * rsqrt(mean(x^2) + 1e-6) in float32 times a learnable weight
  (init 1) for norm1, norm2 and the final norm, still modulated by adaLN;
- `rope=True`: 2D RoPE of EVA-02 (`VisionRotaryEmbeddingFast`, freqs_for='lang', theta 10000)
  on q and k after the optional QK-norm: head_dim/2 channels per axis, the first half rotating
  with the row, frequencies repeated for interleaved pairs; its cos/sin tables are buffers
  (`feat_rope.freqs_cos/sin` in the official state_dict); the absolute pos_embed is still added;
- `qk_norm=True`: RMSNorm over head_dim on q and k (off in the released model).
Named sizes: S, B, L, XL (DiT) and 1p0B, 1p6B (LightningDiT), each with any patch size.

Time (DESIGN.md): the network takes flow time t in [0, 1] (t = 1 is noise) and embeds
`t * time_scale`; `time_scale = 1000` puts t on the scale of DiT's integer steps.
`time_convention="t0_noise"` wraps a network trained the SiT/LightningDiT way (x_t = t x_data +
(1 - t) eps, target x_data - eps, t fed raw, so `time_scale = 1`): it embeds (1 - t) * time_scale
and returns the negated output, so from outside it is a t = 1 noise model predicting
v = eps - x0, while its weights stay exactly the official ones.

`second_time=True` adds a second time input s (the r or s of flow-map and trajectory models:
MeanFlow, shortcut models, CTM) through its own `s_embedder`, a copy of the t embedder:
c = t_emb + s_emb + y_emb; s is mapped like t (time_scale, t0_noise).

`logvar_head=True` appends one output channel, constant over space: a learned log-variance
u(t) = Linear(sinusoid(t * time_scale)), zero-initialised, the uncertainty weighting of EDM2
(Karras et al. 2024, Sec. 4) that sCM (Lu & Song 2025, Sec. 5) learns; objectives read it from
the last channel and the prediction from the first in_channels.

iMF (Geng et al. 2025; Lyy-iiis/imeanflow models/imfDiT.py) adds two switches.
`guidance_conditions=True` takes `guidance=(omega, t_min, t_max)` [B] each. Three more
t-embedder copies embed 1 - 1/omega, t_min and t_max, scaled like t, and add them to c; imfDiT
prepends them as in-context tokens instead. `velocity_head_depth=k` duplicates the last k blocks
and the final layer into a velocity branch that starts after depth - k shared blocks. It returns
[out | v] along channels, with v in_channels wide.

`remat=True` rematerialises every block in the backward pass (jax.checkpoint of the scanned
block, `DiT.run_blocks`). Images are NHWC.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tesserax.core import registry, sharding
from tesserax.core.errors import TesseraxError
from tesserax.nn import layers
from tesserax.nn.attention import Attention

# name: (depth, hidden_size, num_heads), from DiT models.py and LightningDiT models/lightningdit.py.
DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}

# The options beyond DiT, at their DiT values; a model config without them is a DiT.
OPTIONS = dict(mlp="gelu", norm="layernorm", rope=False, qk_norm=False,
               time_convention="t1_noise", remat=False, second_time=False, logvar_head=False,
               guidance_conditions=False, velocity_head_depth=0, scan_blocks=True)
CHOICES = dict(mlp=("gelu", "swiglu"), norm=("layernorm", "rmsnorm"),
               time_convention=("t1_noise", "t0_noise"))


def dit_config(name: str = "XL/2", **overrides) -> ml_collections.ConfigDict:
  """Model config for a named size and patch, e.g. "XL/2", "S/8" or "1p6B/1", with DiT's
  ImageNet-256 defaults (32x32x4 SD-VAE latents, learned sigma, integer-step time scale)."""
  size, patch = name.split("/")
  if size not in DIT_SIZES:
    raise ValueError(f"unknown DiT size {size!r}; known: {sorted(DIT_SIZES)}")
  depth, hidden, heads = DIT_SIZES[size]
  config = ml_collections.ConfigDict(dict(
      name="dit", input_size=32, in_channels=4, patch_size=int(patch), hidden_size=hidden,
      depth=depth, num_heads=heads, mlp_ratio=4.0, num_classes=1000, class_dropout=0.1,
      learn_sigma=True, time_scale=1000.0, dtype="float32", **OPTIONS))
  config.update(overrides)
  return config


def sit_config(name: str = "XL/2", **overrides) -> ml_collections.ConfigDict:
  """SiT: DiT's network with t fed raw and t = 0 noise (willisma/SiT). Learned sigma is on, as
  in the released SiT-XL-2-256 (8 output channels; SiT discards the second half)."""
  return dit_config(name, **{"time_convention": "t0_noise", "time_scale": 1.0, **overrides})


def lightningdit_config(name: str = "XL/1", **overrides) -> ml_collections.ConfigDict:
  """LightningDiT as released (configs/lightningdit_xl_vavae_f16d32.yaml): SwiGLU, RMSNorm,
  RoPE, no QK-norm, no learned sigma, on VA-VAE f16d32 latents (16x16x32 at 256px)."""
  return dit_config(name, **{
      "input_size": 16, "in_channels": 32, "learn_sigma": False, "mlp": "swiglu",
      "norm": "rmsnorm", "rope": True, "time_convention": "t0_noise", "time_scale": 1.0,
      **overrides})


def option(config, key):
  """config[key], or its DiT value for configs written before the option existed."""
  value = config.get(key, OPTIONS[key])
  if key in CHOICES and value not in CHOICES[key]:
    raise ValueError(f"model.{key}={value!r}; choose from {', '.join(CHOICES[key])}")
  return value


def _norm(norm, x):
  """DiT's affine-free LayerNorm where `norm` is None, else the RMSNorm module."""
  return layers.layer_norm(x) if norm is None else norm(x)


class DiTBlock(nnx.Module):
  """x += gate_msa * attn(modulate(norm1(x))); x += gate_mlp * mlp(modulate(norm2(x)))."""

  def __init__(self, dim, num_heads, mlp_ratio, *, mlp="gelu", norm="layernorm", qk_norm=False,
               dtype, rngs):
    self.norm1 = layers.RMSNorm(dim, "embed") if norm == "rmsnorm" else None
    self.norm2 = layers.RMSNorm(dim, "embed") if norm == "rmsnorm" else None
    self.attn = Attention(dim, num_heads, qk_norm=qk_norm, dtype=dtype, rngs=rngs)
    hidden = int(dim * mlp_ratio)
    if mlp == "swiglu":
      self.mlp = layers.SwiGLU(dim, int(2 / 3 * hidden), dtype=dtype, rngs=rngs)
    else:
      self.mlp = layers.Mlp(dim, hidden, dtype=dtype, rngs=rngs)
    self.adaLN_modulation = layers.linear(dim, 6 * dim, ("embed", "mlp"), zero_init=True,
                                          dtype=dtype, rngs=rngs)

  def __call__(self, x, c, rope=None):
    mod = sharding.constrain(self.adaLN_modulation(jax.nn.silu(c)), ("batch", None))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    x = x + gate_msa[:, None] * self.attn(
        layers.modulate(_norm(self.norm1, x), shift_msa, scale_msa), rope=rope)
    x = sharding.constrain(x, ("batch", None, None))
    x = x + gate_mlp[:, None] * self.mlp(
        layers.modulate(_norm(self.norm2, x), shift_mlp, scale_mlp))
    return sharding.constrain(x, ("batch", None, None))


class FinalLayer(nnx.Module):

  def __init__(self, dim, patch_size, out_channels, *, norm="layernorm", dtype, rngs):
    self.norm_final = layers.RMSNorm(dim, "embed") if norm == "rmsnorm" else None
    self.adaLN_modulation = layers.linear(dim, 2 * dim, ("embed", "mlp"), zero_init=True,
                                          dtype=dtype, rngs=rngs)
    self.linear = layers.linear(dim, patch_size * patch_size * out_channels, ("embed", None),
                                zero_init=True, dtype=dtype, rngs=rngs)

  def __call__(self, x, c):
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
    return self.linear(layers.modulate(_norm(self.norm_final, x), shift, scale))


class DiT(nnx.Module):
  """DiT / SiT / LightningDiT over NHWC inputs; `__call__(x, t, labels, train, s)` returns NHWC
  outputs with `out_channels` = 2 * in_channels when `learn_sigma`, else in_channels."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    if c.input_size % c.patch_size:
      raise ValueError(f"input_size {c.input_size} is not divisible by patch_size {c.patch_size}")
    if c.hidden_size % c.num_heads:
      raise ValueError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
    head_dim = c.hidden_size // c.num_heads
    if option(c, "rope") and head_dim % 4:
      raise ValueError(f"RoPE needs head_dim ({head_dim}) divisible by 4")
    dtype = jnp.dtype(c.dtype)
    d = c.hidden_size
    self.patch_size = c.patch_size
    self.in_channels = c.in_channels
    self.out_channels = c.in_channels * (2 if c.learn_sigma else 1)
    self.num_classes = c.num_classes
    self.time_scale = float(c.time_scale)
    self.time_convention = option(c, "time_convention")
    self.remat = option(c, "remat")
    self.scan_blocks = option(c, "scan_blocks")
    self.grid_size = c.input_size // c.patch_size
    self.x_embedder = nnx.Conv(
        c.in_channels, d, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
        dtype=dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(  # xavier on the flattened [D, C*p*p] view
            jax.nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            (None, None, "conv_in", "embed")),
        bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, ("embed",)))
    self.t_embedder = layers.TimestepEmbedder(d, dtype=dtype, rngs=rngs)
    self.y_embedder = layers.label_embedding(c.num_classes, d, null_class=c.class_dropout > 0,
                                             dtype=dtype, rngs=rngs)
    self.pos_embed = layers.Buffer(
        jnp.asarray(layers.sincos_pos_embed_2d(d, self.grid_size), jnp.float32))
    self.feat_rope = layers.RotaryTables(head_dim, self.grid_size) if option(c, "rope") else None
    self.blocks = nnx.List([
        DiTBlock(d, c.num_heads, c.mlp_ratio, mlp=option(c, "mlp"), norm=option(c, "norm"),
                 qk_norm=option(c, "qk_norm"), dtype=dtype, rngs=rngs)
        for _ in range(c.depth)])
    self.final_layer = FinalLayer(d, c.patch_size, self.out_channels, norm=option(c, "norm"),
                                  dtype=dtype, rngs=rngs)
    # Built last, so the other parameters are initialised as without the second time.
    self.s_embedder = (layers.TimestepEmbedder(d, dtype=dtype, rngs=rngs)
                       if option(c, "second_time") else None)
    self.logvar_linear = (layers.linear(layers.TIME_FREQUENCY_DIM, 1, (None, None),
                                        zero_init=True, dtype=dtype, rngs=rngs)
                          if option(c, "logvar_head") else None)
    self.guidance_embedders = (
        nnx.List([layers.TimestepEmbedder(d, dtype=dtype, rngs=rngs) for _ in range(3)])
        if option(c, "guidance_conditions") else None)
    head = option(c, "velocity_head_depth")
    if not 0 <= head < c.depth:
      raise ValueError(f"velocity_head_depth {head} must be in [0, depth {c.depth})")
    self.v_blocks = nnx.List([
        DiTBlock(d, c.num_heads, c.mlp_ratio, mlp=option(c, "mlp"), norm=option(c, "norm"),
                 qk_norm=option(c, "qk_norm"), dtype=dtype, rngs=rngs)
        for _ in range(head)]) if head else None
    self.v_final_layer = FinalLayer(d, c.patch_size, c.in_channels, norm=option(c, "norm"),
                                    dtype=dtype, rngs=rngs) if head else None

  def unpatchify(self, x, channels=None):
    """[B, h*w, p*p*C] with index (p_row, q_col, c) -> [B, h*p, w*p, C], C = `channels` (default
    out_channels)."""
    b, p, g, ch = x.shape[0], self.patch_size, self.grid_size, channels or self.out_channels
    x = x.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, ch)

  def run_blocks(self, h, c, rope, blocks=None):
    """The blocks in order, as one `jax.lax.scan` over their parameters stacked inside the call.

    The parameters stay one subtree per block (`blocks.{i}`, the official layout); only the
    traced computation is a loop. Unrolled, XLA:CPU compiles the backward into huge fusions
    that recompute every block's residual/adaLN chain (DiT-S/2's training step ~2.6x slower);
    the loop also compiles one block, not `depth`. With `scan_blocks=False` (what the
    diffusion task sets when the mesh shards parameters) the blocks run unrolled: XLA's SPMD
    partitioner replicates the stacked FSDP-sharded parameters (DiT-XL/2 at global batch 256
    on 8 devices: 303 GiB of temporaries per device scanned, 35 GiB unrolled;
    benchmarks/pod_memory.py).
    """
    blocks = self.blocks if blocks is None else blocks
    if not self.scan_blocks:
      block_fn = lambda block, h: block(h, c, rope)
      if self.remat:
        block_fn = nnx.remat(block_fn)
      for block in blocks:
        h = block_fn(block, h)
      return h
    graphdef, first = nnx.split(blocks[0])
    treedef = jax.tree.structure(first)
    stacked = [jnp.stack(leaves) for leaves in
               zip(*(jax.tree.leaves(nnx.state(block)) for block in blocks))]

    def body(h, leaves):
      return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(h, c, rope), None

    if self.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.scan(body, h, stacked)[0]

  def __call__(self, x, t, labels, train: bool = False, s=None, guidance=None):
    """x: [B, H, W, C]; t: [B] flow time in [0, 1]; labels: [B] int32 (null = num_classes);
    s: [B] the second time of flow-map / trajectory models (`second_time`), embedded like t
    by its own `s_embedder` and added to the conditioning; guidance: (omega, t_min, t_max), [B]
    each, the iMF guidance conditions (`guidance_conditions`).

    `train` is part of the generator interface; DiT has no dropout, and label dropout for
    classifier-free guidance is the objective's job (it owns the random key).
    """
    del train
    if s is not None and self.s_embedder is None:
      raise TesseraxError("a second time s was given to a DiT without one (model.second_time)")
    if s is None and self.s_embedder is not None:
      raise TesseraxError("this DiT has a second time input (model.second_time); pass s")
    flip = self.time_convention == "t0_noise"
    if flip:
      t = 1 - t
    h = self.x_embedder(x)
    h = h.reshape(h.shape[0], -1, h.shape[-1]) + self.pos_embed[...].astype(h.dtype)
    c = self.t_embedder(t * self.time_scale)
    if s is not None:
      c = c + self.s_embedder(((1 - s) if flip else s) * self.time_scale)
    c = c + self.y_embedder(labels)
    if (guidance is None) != (self.guidance_embedders is None):
      raise TesseraxError("guidance conditions go with model.guidance_conditions: pass "
                          "(omega, t_min, t_max) exactly when it is set")
    if guidance is not None:
      omega, t_min, t_max = guidance
      for embed, value in zip(self.guidance_embedders, (1 - 1 / omega, t_min, t_max)):
        c = c + embed(value * self.time_scale)
    rope = self.feat_rope() if self.feat_rope is not None else None
    if self.v_blocks is None:
      h = self.run_blocks(h, c, rope)
    else:
      h = self.run_blocks(h, c, rope, list(self.blocks)[:len(self.blocks) - len(self.v_blocks)])
      h, h_v = self.run_blocks(h, c, rope, list(self.blocks)[-len(self.v_blocks):]), h
      h_v = self.run_blocks(h_v, c, rope, list(self.v_blocks))
    out = layers.at_least_f32(self.unpatchify(self.final_layer(h, c)))
    out = -out if flip else out
    if self.v_blocks is not None:
      v = layers.at_least_f32(self.unpatchify(self.v_final_layer(h_v, c), self.in_channels))
      out = jnp.concatenate([out, -v if flip else v], axis=-1)
    if self.logvar_linear is None:
      return out
    logvar = self.logvar_linear(layers.timestep_embedding(t * self.time_scale))
    return jnp.concatenate(
        [out, jnp.broadcast_to(logvar[:, None, None].astype(out.dtype), out.shape[:3] + (1,))],
        axis=-1)


registry.NETWORKS.register("dit", DiT)

def count_params(config) -> int:
  """Parameters as torch's `model.parameters()` counts them in the official code: the nnx.Params
  plus pos_embed (an nn.Parameter with requires_grad=False there); RoPE tables are buffers."""
  model = nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum(int(np.prod(x.shape)) for x in params) + int(np.prod(model.pos_embed.shape))


def forward_flops(config) -> float:
  """Forward FLOPs per image (2 per multiply-accumulate), counted from the module shapes.

  DiT's "Gflops" are multiply-accumulates: XL/2 at 256px is 118.6 GMACs, i.e. ~237 GFLOP
  (DiT paper, Table 4). A training step costs ~3x the forward pass without remat
  (~4x with it). SwiGLU's H = 2/3 * 4D keeps the MLP's MACs; norms and RoPE are elementwise
  and not counted.
  """
  c = config
  d, p = c.hidden_size, c.patch_size
  tokens = (c.input_size // p) ** 2
  out_channels = c.in_channels * (2 if c.learn_sigma else 1)
  hidden = int(d * c.mlp_ratio)
  mlp = 3 * d * int(2 / 3 * hidden) if option(c, "mlp") == "swiglu" else 2 * d * hidden
  per_block = (tokens * (3 * d * d + d * d + mlp)                # qkv, proj, MLP
               + 2 * tokens * tokens * d                      # q k^T and attention @ v
               + d * 6 * d)                                   # adaLN modulation
  time_mlps = 2 if option(c, "second_time") else 1
  macs = (tokens * p * p * c.in_channels * d                  # patch embedding
          + time_mlps * (layers.TIME_FREQUENCY_DIM * d + d * d)  # timestep MLP(s)
          + c.depth * per_block
          + d * 2 * d + tokens * d * p * p * out_channels)    # final layer
  return 2.0 * macs
