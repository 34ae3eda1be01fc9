"""FlexTok (Bachmann et al. 2025, "FlexTok: Resampling Images into 1D Token Sequences of
Flexible Length"): images -> 1..256 FSQ tokens ordered coarse to fine -> a rectified-flow
decoder that turns any prefix back into an image.

Architecture of apple/ml-flextok (flextok/model/*, flextok_wrapper.py):
- VAE: an SDXL-style diffusers AutoencoderKL (f8, 16 latent channels; flextok/vae_wrapper.py),
  here tokenizers/kl_autoencoder.py; latents multiplied by the VAE's `scaling_factor`
  (decoded divided by it). Without `vae` in the config the images themselves are the latents
  (pixel FlexTok for small images).
- Blocks (layers/transformer_blocks.py FlexBlock): pre-norm, LayerNorm without affine
  parameters or bias (eps 1e-5, float32); attention with separate wq, wk, wv, proj and no
  biases, per-head non-affine LayerNorm on q and k, scale 8 / head_dim; SwiGLU
  fc2(silu(fc1 x) * fc3 x), hidden int(2 int(mlp_ratio d) / 3), no biases.
- Encoder: 2x2 patches of the latent -> Linear (bias) + fixed 2-D sin-cos position embedding
  (utils/posembs.py, MoCo-v3 build with meshgrid(w, h, indexing='ij')); 256 learned
  registers appended; mask "causal_last" (flex_seq_packing.py generate_prefix_packed_seq_mask):
  patches attend to all patches, register i to all patches and registers 0..i; the registers
  out -> non-affine LN -> Linear(d, 6) -> FSQ (tokenizers/fsq.py).
- Decoder: codes -> Linear(6, d) + learned 1-D position embedding; registers i >= keep_k are
  overwritten by the learned mask token (nested dropout, token_dropout.py); the null condition
  overwrites all registers by a learned vector or zeros (nullcond.py); noised latent patches ->
  Linear + sin-cos embedding; [patches, registers] with full attention through adaLN-zero
  blocks (FlexBlockAdaLN) whose modulation Linear(d, E 6 d) gives one set of (gate_msa,
  gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp) per sub-sequence, patches first
  (expand_emb_per_subseq, E = 2); the time embedding is DiT's with max period 256, [cos, sin]
  and frequencies times 1000 / max_timestep (time_embedding.py); the patches out ->
  non-affine LN, adaLN shift / scale, Linear -> velocity patches -> unpatchify.
- Flow: t = 1 is noise, v = eps - x0 (flow_matching/noise_modules.py), tesserax's convention.

Latent arrays are NHWC; a patch vector is ordered (row offset, column offset, channel) as
einops' "(n0 p0) (n1 p1) d -> n0 n1 (p0 p1 d)". Parameter names follow the official module
names (convert/flextok_checkpoints.py maps them to the state-dict keys).
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.nn import attention
from tesserax.nn.layers import at_least_f32
from tesserax.sampling import flextok_decode
from tesserax.tokenizers import fsq, kl_autoencoder, tokenizer

LN_EPS = 1e-5
TIME_FREQUENCY_DIM = 256
TIME_MAX_PERIOD = 256.0
DEPTHS = {"d12-d12": (12, 12), "d18-d18": (18, 18), "d18-d28": (18, 28)}


def vae_config(latent_channels=16, resolution=256) -> ml_collections.ConfigDict:
  """FlexTok's VAE (vae_wrapper.py VAE_BASE_CFG): diffusers AutoencoderKL, block_out_channels
  (128, 256, 512, 512), 2 layers per block, GroupNorm 32, attention in the mid blocks only."""
  return ml_collections.ConfigDict(dict(
      resolution=resolution, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
      attn_resolutions=(), z_channels=latent_channels, embed_dim=latent_channels,
      in_channels=3, dtype="float32"))


def flextok_config(name: str = "d18-d28", **overrides) -> ml_collections.ConfigDict:
  """The released FlexTok sizes: encoder depth - decoder depth, width 64 x depth, head_dim 64.
  `vae_scaling_factor` and `max_timestep` (TimestepEmbedder's class default is 1000 for times
  in [0, 1000]; 1 suits times in [0, 1]) are this code's choice for training; the converter
  takes the checkpoint's values."""
  if name not in DEPTHS:
    raise TesseraxError(f"unknown FlexTok size {name!r}; choose from {', '.join(DEPTHS)}")
  enc, dec = DEPTHS[name]
  c = ml_collections.ConfigDict(dict(
      resolution=256, channels=3, vae=vae_config(), vae_scaling_factor=1.0, patch_size=2,
      num_registers=256, levels=fsq.FLEXTOK_LEVELS, encoder_dim=64 * enc, encoder_depth=enc,
      decoder_dim=64 * dec, decoder_depth=dec, head_dim=64, mlp_ratio=4.0, adaln_expansion=2,
      null_cond="learned", max_timestep=1.0, decode_steps=20, guidance_scale=7.5,
      guidance="apg", dtype="float32"))
  c.update(overrides)
  return c


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A pixel FlexTok for tests and the digits demo: 16x16x1 images, 4x4 patches, 8 registers."""
  c = ml_collections.ConfigDict(dict(
      resolution=16, channels=1, patch_size=4, num_registers=8, levels=fsq.FLEXTOK_LEVELS,
      encoder_dim=32, encoder_depth=2, decoder_dim=32, decoder_depth=2, head_dim=16,
      mlp_ratio=4.0, adaln_expansion=2, null_cond="learned", max_timestep=1.0,
      decode_steps=4, guidance_scale=1.0, guidance="apg", dtype="float32"))
  c.update(overrides)
  return c


@functools.lru_cache(maxsize=None)
def sincos_posemb_2d(dim: int, h: int, w: int) -> np.ndarray:
  """[h * w, dim] float64, row-major over (row, column): utils/posembs.py
  build_2d_sincos_posemb(h, w), temperature 1e4, concat [sin a, cos a, sin b, cos b] with
  (a, b) the meshgrid(arange(w), arange(h), indexing='ij') coordinates of flat index n, read
  back as "(h w)": a = n // h, b = n % h. For h = w the first half follows the row."""
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
  omega = 1.0 / 1e4 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  n = np.arange(h * w)
  a, b = (n // h)[:, None] * omega, (n % h)[:, None] * omega
  return np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1)


def layer_norm(x, eps=LN_EPS):
  """Fp32LayerNorm(bias=False, elementwise_affine=False): normalised over the last axis in (at
  least) float32, cast back."""
  x32 = at_least_f32(x)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_embedding(t, max_timestep, dim=TIME_FREQUENCY_DIM, max_period=TIME_MAX_PERIOD):
  """[cos, sin] of t * (1000 / max_timestep) * max_period ** (-i / (dim / 2))
  (time_embedding.py TimestepEmbedder.timestep_embedding)."""
  half = dim // 2
  t = at_least_f32(t)
  freqs = (1000.0 / max_timestep) * jnp.exp(
      -math.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
  args = t[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x, p):
  """[B, H, W, C] -> [B, (H / p) (W / p), p p C], patches row-major, vectors (p0, p1, c)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, h, w):
  """The inverse of `patchify` for an [h, w] grid of latent pixels."""
  b, _, d = x.shape
  c = d // (p * p)
  x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def _dense(din, dout, names, *, bias, rngs, dtype, zero_init=False):
  init = jax.nn.initializers.zeros if zero_init else jax.nn.initializers.xavier_uniform()
  return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, rngs=rngs,
                    kernel_init=nnx.with_partitioning(init, names),
                    bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, (names[1],)))


def _param(key, shape, names, std=0.02):
  """A trunc-normal(std) parameter (registers, mask token, null condition, 1-D posemb)."""
  init = nnx.with_partitioning(jax.nn.initializers.truncated_normal(std), names)
  return nnx.Param(init(key, shape))


class Attention(nnx.Module):
  """FlexAttention (layers/attention.py): wq, wk, wv, proj without biases; non-affine
  LayerNorm over head_dim on q and k; scale 8 / head_dim."""

  def __init__(self, dim, head_dim, *, dtype, rngs):
    self.num_heads, self.head_dim = dim // head_dim, head_dim
    dense = functools.partial(_dense, bias=False, rngs=rngs, dtype=dtype)
    self.wq, self.wk, self.wv = (dense(dim, dim, ("embed", "heads")) for _ in range(3))
    self.proj = dense(dim, dim, ("heads", "embed"))

  def __call__(self, x, mask):
    b, t, _ = x.shape
    q, k, v = (f(x).reshape(b, t, self.num_heads, self.head_dim)
               for f in (self.wq, self.wk, self.wv))
    out = attention.dot_product_attention(layer_norm(q), layer_norm(k), v, mask,
                                          scale=8.0 / self.head_dim)
    return self.proj(out.reshape(b, t, -1))


class GatedMlp(nnx.Module):
  """SwiGLU (layers/mlp.py GatedMlp, bias False): fc2(silu(fc1 x) * fc3 x)."""

  def __init__(self, dim, hidden, *, dtype, rngs):
    dense = functools.partial(_dense, bias=False, rngs=rngs, dtype=dtype)
    self.fc1 = dense(dim, hidden, ("embed", "mlp"))
    self.fc3 = dense(dim, hidden, ("embed", "mlp"))
    self.fc2 = dense(hidden, dim, ("mlp", "embed"))

  def __call__(self, x):
    return self.fc2(jax.nn.silu(self.fc1(x)) * self.fc3(x))


def mlp_hidden(dim, mlp_ratio):
  """GatedMlp's hidden width int(2 int(mlp_ratio dim) / 3): 768 -> 2048, 1792 -> 4778."""
  return int(2 * int(dim * mlp_ratio) / 3)


class Block(nnx.Module):
  """FlexBlock, or with `adaln_expansion` E > 0 FlexBlockAdaLN: `adaLN_modulation` =
  Linear(d, E 6 d) (bias, zero-init) on silu(time embedding)."""

  def __init__(self, dim, head_dim, mlp_ratio, adaln_expansion=0, *, dtype, rngs):
    self.attn = Attention(dim, head_dim, dtype=dtype, rngs=rngs)
    self.mlp = GatedMlp(dim, mlp_hidden(dim, mlp_ratio), dtype=dtype, rngs=rngs)
    if adaln_expansion:
      self.adaLN_modulation = _dense(dim, adaln_expansion * 6 * dim, ("embed", "mlp"),
                                     bias=True, zero_init=True, rngs=rngs, dtype=dtype)

  def __call__(self, x, mask, modulation=None):
    """modulation: [B, T, 6 d] per token (adaLN blocks), from `token_modulation`."""
    if modulation is None:
      x = x + self.attn(layer_norm(x), mask)
      return x + self.mlp(layer_norm(x))
    gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(
        modulation, 6, axis=-1)
    x = x + gate_msa * self.attn(layer_norm(x) * (1 + scale_msa) + shift_msa, mask)
    return x + gate_mlp * self.mlp(layer_norm(x) * (1 + scale_mlp) + shift_mlp)


def token_modulation(modulation, expansion, lengths):
  """[B, E X] -> [B, sum(lengths), X]: the E chunks in order, chunk e repeated over the tokens
  of sub-sequence e (flex_seq_packing.py expand_emb_per_subseq); E = 1 serves every token."""
  b = modulation.shape[0]
  chunks = modulation.reshape(b, expansion, -1)
  if expansion == 1:
    return jnp.broadcast_to(chunks, (b, sum(lengths), chunks.shape[-1]))
  return jnp.repeat(chunks, np.asarray(lengths), axis=1, total_repeat_length=sum(lengths))


def causal_last_mask(num_patches, num_registers):
  """bool [T, T], True where a query may attend: every query sees the patches; register
  queries also see the registers up to themselves."""
  t = num_patches + num_registers
  q, k = np.arange(t)[:, None], np.arange(t)[None, :]
  return (k < num_patches) | (k <= q)


class Encoder(nnx.Module):

  def __init__(self, c, latent_channels, grid, *, dtype, rngs):
    d, p = c.encoder_dim, c.patch_size
    self.patch_proj = _dense(p * p * latent_channels, d, (None, "embed"), bias=True,
                             rngs=rngs, dtype=dtype)
    self.posemb_shape = (d,) + tuple(grid)  # the fixed sin-cos embedding, not a parameter
    self.registers = _param(rngs.params(), (c.num_registers, d), (None, "embed"))
    self.blocks = nnx.List([Block(d, c.head_dim, c.mlp_ratio, dtype=dtype, rngs=rngs)
                            for _ in range(c.encoder_depth)])
    self.to_latents = _dense(d, len(c.levels), ("embed", None), bias=True, zero_init=True,
                             rngs=rngs, dtype=dtype)
    self.patch_size = p

  def __call__(self, latents):
    """Unquantised register outputs [B, R, len(levels)] of latents [B, H, W, C]."""
    x = self.patch_proj(patchify(latents, self.patch_size))
    x = x + sincos_posemb_2d(*self.posemb_shape).astype(x.dtype)
    b, n, d = x.shape
    registers = jnp.broadcast_to(self.registers[...].astype(x.dtype), (b,) + self.registers.shape)
    x = jnp.concatenate([x, registers], axis=1)
    mask = jnp.asarray(causal_last_mask(n, self.registers.shape[0]))[None, None]
    for block in self.blocks:
      x = block(x, mask)
    return self.to_latents(layer_norm(x[:, n:]))


class Decoder(nnx.Module):

  def __init__(self, c, latent_channels, grid, *, dtype, rngs):
    d, p = c.decoder_dim, c.patch_size
    self.from_latents = _dense(len(c.levels), d, (None, "embed"), bias=True, rngs=rngs,
                               dtype=dtype)
    self.registers_posemb = _param(rngs.params(), (c.num_registers, d), (None, "embed"))
    self.mask_token = _param(rngs.params(), (d,), ("embed",))
    if c.null_cond == "learned":
      self.nullcond = _param(rngs.params(), (d,), ("embed",))
    elif c.null_cond != "zero":
      raise TesseraxError(f"null_cond {c.null_cond!r}: choose learned or zero")
    self.patch_proj = _dense(p * p * latent_channels, d, (None, "embed"), bias=True,
                             rngs=rngs, dtype=dtype)
    self.posemb_shape = (d,) + tuple(grid)
    self.time_mlp_0 = _dense(TIME_FREQUENCY_DIM, d, (None, "embed"), bias=True, rngs=rngs,
                             dtype=dtype)
    self.time_mlp_2 = _dense(d, d, ("mlp", "embed"), bias=True, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([
        Block(d, c.head_dim, c.mlp_ratio, c.adaln_expansion, dtype=dtype, rngs=rngs)
        for _ in range(c.decoder_depth)])
    self.to_patches_adaLN_modulation = _dense(d, 2 * d, ("embed", "mlp"), bias=True,
                                              zero_init=True, rngs=rngs, dtype=dtype)
    self.to_patches_proj = _dense(d, p * p * latent_channels, ("embed", None), bias=True,
                                  zero_init=True, rngs=rngs, dtype=dtype)
    self.patch_size, self.max_timestep = p, c.max_timestep
    self.adaln_expansion = c.adaln_expansion

  def registers(self, codes, keep_k, null):
    """The register sequence [B, R, d]: Linear(codes) + position embedding, registers
    i >= keep_k [B] replaced by the mask token, all of them by the null condition where
    null [B]."""
    r = self.from_latents(codes) + self.registers_posemb[...]
    dropped = jnp.arange(r.shape[1])[None, :, None] >= keep_k[:, None, None]
    r = jnp.where(dropped, self.mask_token[...].astype(r.dtype), r)
    nullcond = (self.nullcond[...].astype(r.dtype) if hasattr(self, "nullcond")
                else jnp.zeros((), r.dtype))
    return jnp.where(null[:, None, None], nullcond, r)

  def __call__(self, x_t, t, codes, keep_k, null, features_at=None):
    """The velocity [B, H, W, C] at noised latents x_t and flow times t [B]; with
    `features_at` = i also the patch tokens [B, N, d] after block i (REPA's features,
    FlexTransformer intermediate_layers)."""
    b, h, w, _ = x_t.shape
    x = self.patch_proj(patchify(x_t, self.patch_size))
    x = x + sincos_posemb_2d(*self.posemb_shape).astype(x.dtype)
    r = self.registers(codes.astype(x.dtype), keep_k, null)
    lengths = (x.shape[1], r.shape[1])
    temb = self.time_mlp_2(jax.nn.silu(self.time_mlp_0(
        timestep_embedding(t, self.max_timestep).astype(x.dtype))))
    c = jax.nn.silu(temb)
    seq = jnp.concatenate([x, r], axis=1)
    features = None
    for i, block in enumerate(self.blocks):
      modulation = token_modulation(block.adaLN_modulation(c), self.adaln_expansion, lengths)
      seq = block(seq, None, modulation)
      if i == features_at:
        features = seq[:, :lengths[0]]
    shift, scale = jnp.split(self.to_patches_adaLN_modulation(c), 2, axis=-1)
    out = layer_norm(seq[:, :lengths[0]]) * (1 + scale[:, None]) + shift[:, None]
    v = unpatchify(self.to_patches_proj(out), self.patch_size, h, w)
    return v if features_at is None else (v, features)


class FlexTok(nnx.Module):
  """A discrete tokenizer (tokenizers/tokenizer.py): int32 token ids [B, num_registers] in
  [0, 64000), any prefix of which decodes to an image."""

  is_discrete = True
  flexible_length = True  # decodes any prefix (tokenizers/reconstruct.py decode_settings)
  latent_dtype = np.int32

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.dtype)
    self.decode_defaults = (c.decode_steps, float(c.guidance_scale), c.guidance)
    self.resolution, self.channels = c.resolution, c.channels
    self.levels = tuple(c.levels)
    self.codebook_size = fsq.codebook_size(self.levels)
    self.num_registers = c.num_registers
    self.latent_shape = (c.num_registers,)
    if c.get("vae") is not None:
      self.vae = kl_autoencoder.KLAutoencoder(c.vae, rngs=rngs)
      latent = self.vae.latent_shape
      self.scaling_factor = float(c.vae_scaling_factor)
    else:
      latent = (c.resolution, c.resolution, c.channels)
    self.latent_grid = latent
    if latent[0] % c.patch_size or latent[1] % c.patch_size:
      raise TesseraxError(f"latent grid {latent[:2]} is not divisible by patch_size "
                          f"{c.patch_size}")
    grid = (latent[0] // c.patch_size, latent[1] // c.patch_size)
    self.encoder = Encoder(c, latent[2], grid, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(c, latent[2], grid, dtype=dtype, rngs=rngs)

  def image_latents(self, images, keys=None):
    """The encoder's input [B, H, W, C]: VAE latents (posterior mean, or a sample with keys)
    times the scaling factor, or the images themselves without a VAE."""
    tokenizer.check_images(images, self.resolution, self.channels)
    if not hasattr(self, "vae"):
      return images
    return self.vae.encode(images, keys) * self.scaling_factor

  def latent_images(self, latents):
    """Images of decoder latents: the VAE decoding of latents / scaling_factor."""
    if not hasattr(self, "vae"):
      return latents
    return self.vae.decode(latents / self.scaling_factor)

  def quantize(self, latents):
    """(codes [B, R, 6] in [-1, 1], ids int32 [B, R]) of encoder latents."""
    codes = fsq.quantize(self.encoder(latents), self.levels)
    return codes, fsq.codes_to_indices(codes, self.levels)

  def encode(self, images, keys=None):
    return self.quantize(self.image_latents(images, keys))[1]

  def velocity(self, x_t, t, codes, keep_k=None, null=None):
    """One decoder evaluation: v [B, H, W, C] at x_t, t [B], register codes [B, R, 6], keeping
    the first keep_k [B] registers (default all), null [B] the null condition (default
    none)."""
    b = x_t.shape[0]
    keep_k = jnp.full((b,), self.num_registers) if keep_k is None else keep_k
    null = jnp.zeros((b,), bool) if null is None else null
    return self.decoder(x_t, t, codes, keep_k, null)

  def check_tokens(self, ids, num_tokens):
    """Token ids [B, K] with 1 <= K <= num_registers and num_tokens (None, an int or [B]) in
    1..K, refused in one line otherwise (values checked where concrete)."""
    if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.num_registers:
      raise TesseraxError(f"token ids of shape {tuple(ids.shape)}; FlexTok decodes [B, K] "
                          f"with K in 1..{self.num_registers}")
    if not isinstance(ids, jax.core.Tracer):
      bad = np.asarray(ids)
      if bad.size and (bad.min() < 0 or bad.max() >= self.codebook_size):
        raise TesseraxError(f"token ids in [{bad.min()}, {bad.max()}]; the FSQ codebook has "
                            f"ids 0..{self.codebook_size - 1}")
    if num_tokens is not None and not isinstance(num_tokens, jax.core.Tracer):
      k = np.asarray(num_tokens)
      if k.size and (k.min() < 1 or k.max() > ids.shape[1]):
        raise TesseraxError(f"num_tokens {k.min() if k.min() < 1 else k.max()} is outside "
                            f"1..{ids.shape[1]} (the tokens given)")

  def decode(self, ids, num_tokens=None, *, steps=None, guidance_scale=None, guidance=None,
             key=None):
    """Images [B, R, R, C] of token ids [B, K] (K <= num_registers; ids past K are not read),
    decoded from the first `num_tokens` (int or [B], default K) by the rectified-flow sampler
    (sampling/flextok_decode.py): `steps` Euler steps, guidance scale and kind ("apg", "cfg")
    defaulting to the config, from the noise of `key` (default PRNGKey(0))."""
    self.check_tokens(ids, num_tokens)
    default_steps, default_scale, default_guidance = self.decode_defaults
    b, k = ids.shape
    keep_k = jnp.broadcast_to(jnp.asarray(k if num_tokens is None else num_tokens, jnp.int32),
                              (b,))
    ids = jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, self.num_registers - k)))
    codes = fsq.indices_to_codes(ids, self.levels)
    key = jax.random.PRNGKey(0) if key is None else key
    noise = jax.random.normal(key, (b,) + self.latent_grid)

    def velocity_fn(x, t, null):  # x: the batch, or with guidance each example twice
      copies = x.shape[0] // b
      return self.velocity(x, t, jnp.repeat(codes, copies, axis=0),
                           jnp.repeat(keep_k, copies), null)

    latents = flextok_decode.decode(velocity_fn, noise,
        default_steps if steps is None else steps,
        default_scale if guidance_scale is None else guidance_scale,
        default_guidance if guidance is None else guidance)
    return self.latent_images(latents)


# ------------------------------------------------------------------------------ training
# apple/ml-flextok releases no training code; these pieces follow its modules' training
# branches (token_dropout.py, nullcond.py, quantize_fsq.py, noise_modules.py) and the paper
# (nested dropout over the registers, rectified-flow decoder loss, REPA on decoder layer 1).

KEEP_K_MODES = ("uniform", "pow2", "uniform_pow2")


def sample_keep_k(key, batch, num_registers, mode="uniform"):
  """int32 [batch], one keep_k per example (MaskedNestedDropout.sample_keep_k): "uniform" in
  1..N; "pow2" uniform over the powers of two 1, 2, 4, .., N; "uniform_pow2" uniform in 1..N
  rounded up to a power of two."""
  if mode == "uniform":
    return jax.random.randint(key, (batch,), 1, num_registers + 1)
  if mode == "pow2":
    if num_registers & (num_registers - 1):
      raise TesseraxError(f"keep_k mode pow2 needs a power-of-two register count, got "
                          f"{num_registers}")
    powers = 2 ** jax.random.randint(key, (batch,), 0, num_registers.bit_length())
    return powers.astype(jnp.int32)
  if mode == "uniform_pow2":
    k = jax.random.randint(key, (batch,), 1, num_registers + 1)
    return (2 ** jnp.ceil(jnp.log2(k.astype(jnp.float32)))).astype(jnp.int32)
  raise TesseraxError(f"unknown keep_k mode {mode!r}; choose from {', '.join(KEEP_K_MODES)}")


class RepaProjector(nnx.Module):
  """REPA's projector (Yu et al. 2025, §3): Linear -> SiLU -> Linear -> SiLU -> Linear from the
  decoder width to the target features' width. Not part of the released checkpoints."""

  def __init__(self, dim, feature_dim, hidden=2048, *, rngs):
    dense = functools.partial(_dense, bias=True, rngs=rngs, dtype=None)
    self.fc1 = dense(dim, hidden, ("embed", "mlp"))
    self.fc2 = dense(hidden, hidden, ("mlp", None))
    self.fc3 = dense(hidden, feature_dim, (None, None))

  def __call__(self, x):
    return self.fc3(jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(x)))))


def repa_loss(projected, targets, eps=1e-8):
  """-mean cos(projected, targets) over examples and patches, both [B, N, D'] (REPA eq. 8)."""
  dot = jnp.sum(projected * targets, -1)
  norms = jnp.linalg.norm(projected, axis=-1) * jnp.linalg.norm(targets, axis=-1)
  return -jnp.mean(dot / jnp.maximum(norms, eps))


def training_loss(model, key, images, *, latent_keys=None, keep_k_mode="uniform",
                  null_prob=0.0, skip_rounding_prob=0.0, projector=None, repa_targets=None,
                  repa_layer=1, repa_weight=1.0):
  """(loss, metrics) of one FlexTok batch, end to end through encoder, FSQ and decoder.

  The VAE is frozen (its latents are a constant): a posterior sample with `latent_keys` [B]
  (the official `sample_posterior`), its mean without. Per example: keep_k from `sample_keep_k`,
  the null condition with probability `null_prob` (CFG dropout), FSQ rounding skipped with
  probability `skip_rounding_prob` (drop_quant_p), t = sigmoid(n), n ~ N(0, 1) (MinRFNoiseModule
  ln=True), x_t = (1 - t) x0 + t eps. Loss: mean (v - (eps - x0))^2, plus with a `projector`
  and `repa_targets` [B, N, D'] (frozen encoder patch features on the decoder's patch grid)
  repa_weight * repa_loss of the projected patch tokens after decoder block `repa_layer`."""
  k_keep, k_null, k_skip, k_t, k_eps = jax.random.split(key, 5)
  b = images.shape[0]
  x0 = jax.lax.stop_gradient(model.image_latents(images, latent_keys))
  skip = jax.random.bernoulli(k_skip, skip_rounding_prob, (b,))
  codes = fsq.quantize(model.encoder(x0), model.levels, skip)
  keep_k = sample_keep_k(k_keep, b, model.num_registers, keep_k_mode)
  null = jax.random.bernoulli(k_null, null_prob, (b,))
  t = jax.nn.sigmoid(jax.random.normal(k_t, (b,)))
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
  use_repa = projector is not None and repa_targets is not None
  out = model.decoder(x_t, t, codes, keep_k, null, repa_layer if use_repa else None)
  v, features = out if use_repa else (out, None)
  flow = jnp.mean(jnp.square(v - (eps - x0)))
  metrics = {"flow_loss": flow}
  loss = flow
  if use_repa:
    metrics["repa_loss"] = repa_loss(projector(features), repa_targets)
    loss = loss + repa_weight * metrics["repa_loss"]
  return loss, metrics


def build(config, seed=0) -> FlexTok:
  return FlexTok(config, rngs=nnx.Rngs(seed))


def count_params(config) -> dict:
  """Parameter counts {"vae", "encoder", "decoder", "total", "file"}: trainable parameters,
  and "file" the values of the official state dict, which also stores the two fixed sin-cos
  position embeddings."""
  model = nnx.eval_shape(lambda: build(config))
  size = lambda state: sum(int(np.prod(x.shape)) for _, x in nnx.to_flat_state(state))
  counts = {part: size(nnx.state(getattr(model, part), nnx.Param)) if hasattr(model, part)
            else 0 for part in ("vae", "encoder", "decoder")}
  counts["total"] = sum(counts.values())
  counts["file"] = counts["total"] + sum(
      int(np.prod(part.posemb_shape)) for part in (model.encoder, model.decoder))
  return counts


registry.TOKENIZERS.register("flextok", FlexTok)
