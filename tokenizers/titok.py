"""TiTok, "An Image is Worth 32 Tokens for Reconstruction and Generation" (Yu et al. 2024), and
TA-TiTok (Kim et al. 2025, arXiv 2501.07730): a ViT that reads an image into N latent tokens and
a ViT that decodes them, bytedance/1d-tokenizer modeling/titok.py, modeling/tatitok.py and
modeling/modules/blocks.py.

- Blocks (ResidualAttentionBlock): pre-LN, LayerNorm(eps 1e-5, affine), torch
  MultiheadAttention (packed [q; k; v] projection, `out_proj`), MLP c_fc -> exact GELU -> c_proj
  (4x); no dropout.
- Encoder: a 16x16 stride-16 patch conv, [class token, patches] + positional_embedding, then the
  learned `latent_tokens` + latent_token_positional_embedding appended; ln_pre, the blocks, the
  last N outputs through ln_post and a 1x1 conv `conv_out` to token_size (2 * token_size for
  the VAE variants: mean | logvar). The legacy models (L-32, B-64, S-128; `is_legacy`, default
  True upstream) reinterpret the [B, N, W] ln_post output's memory as [B, W, N, 1] with a
  reshape, not a permute, before conv_out; their weights were trained so, and it is kept.
- Bottleneck (tokenizers/quantizers.py): VQ (l2-normalised codebook for the legacy models) or a
  diagonal Gaussian.
- Decoder: decoder_embed Linear(token_size -> W) + latent_token_positional_embedding; the
  sequence [class token, (R/p)^2 mask tokens] + positional_embedding, then the latents, then
  (TA-TiTok) 77 text tokens text_guidance_proj(text features) + their positional embedding;
  ln_pre, blocks, ln_post on the mask-token positions, then the head:
  legacy: ffn 1x1 conv W -> 2W, tanh, 1x1 conv 2W -> 1024: logits over the MaskGIT-VQGAN
    codebook at every grid position; softmax(logits) mixes `pixel_quantize` [1024, 256] and the
    MaskGIT-VQGAN decoder (tokenizers/maskgit_vqgan.py) paints the image (finetune_decoder);
  non-legacy: ffn 1x1 conv W -> p * p * 3 read as 'b (p1 p2 c) h w -> b c (h p1) (w p2)', then
    conv_out 3x3 (3 -> 3); `channels` (3 in every release) sets the image channels.
- Images: the network works on RGB in [0, 1] (the official input and output); `encode`, `decode`
  and `__call__` take and give tesserax's [-1, 1].

Token ids [B, N] int32 (VQ) or latents [B, N, token_size] float32 (VAE). Parameter names mirror
the official state dict up to the renames in convert/titok_checkpoints.py.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.nn import layers
from tesserax.nn.attention import Attention
from tesserax.tokenizers import kl_autoencoder, maskgit_vqgan, quantizers, tokenizer

# (width, depth, heads) of blocks.py TiTokEncoder / TiTokDecoder.
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}
TEXT_CONTEXT, TEXT_DIM = 77, 768  # OpenAI CLIP ViT-L/14 text tokens (TA-TiTok)


def titok_config(encoder="large", decoder="large", num_latent_tokens=32, token_size=12,
                 quantize="vq", codebook_size=4096, use_l2_norm=True, legacy=True,
                 finetune_decoder=True, text=False, clustering_vq=False,
                 **overrides) -> ml_collections.ConfigDict:
  """A TiTok model config; `encoder`/`decoder` name a ViT size ("small", "base", "large")."""
  (ew, ed, eh), (dw, dd, dh) = VIT_SIZES[encoder], VIT_SIZES[decoder]
  config = ml_collections.ConfigDict(dict(
      resolution=256, patch_size=16, channels=3, enc_width=ew, enc_depth=ed, enc_heads=eh,
      dec_width=dw, dec_depth=dd, dec_heads=dh, num_latent_tokens=num_latent_tokens,
      token_size=token_size,
      quantize=quantize, codebook_size=codebook_size if quantize == "vq" else 0,
      use_l2_norm=use_l2_norm, commitment_cost=quantizers.COMMITMENT_COST,
      clustering_vq=clustering_vq, legacy=legacy, finetune_decoder=finetune_decoder,
      pixel_codebook_size=1024, text_context=TEXT_CONTEXT if text else 0, text_dim=TEXT_DIM,
      pixel=maskgit_vqgan.maskgit_vqgan_f16(), dtype="float32"))
  config.update(overrides)
  return config


def _vq8k(encoder, decoder, n, **kw):
  return titok_config(encoder, decoder, n, 64, "vq", 8192, False, False, False, **kw)


def _vae(encoder, decoder, n, **kw):
  return titok_config(encoder, decoder, n, 16, "vae", 0, False, False, False, **kw)


# configs/infer/TiTok/*.yaml and configs/infer/TA-TiTok/*.yaml; TA-TiTok's HF configs set
# clustering_vq (a training-time codebook update, tokenizers/quantizers.py cluster_codebook).
CONFIGS = {
    "titok_l32": functools.partial(titok_config, "large", "large", 32),
    "titok_b64": functools.partial(titok_config, "base", "base", 64),
    "titok_s128": functools.partial(titok_config, "small", "small", 128),
    "titok_bl64_vq8k": functools.partial(_vq8k, "base", "large", 64),
    "titok_bl128_vq8k": functools.partial(_vq8k, "base", "large", 128),
    "titok_sl256_vq8k": functools.partial(_vq8k, "small", "large", 256),
    "titok_ll32_vae_c16": functools.partial(_vae, "large", "large", 32),
    "titok_bl64_vae_c16": functools.partial(_vae, "base", "large", 64),
    "titok_bl128_vae_c16": functools.partial(_vae, "base", "large", 128),
    "tatitok_bl32_vq": functools.partial(_vq8k, "base", "large", 32, text=True,
                                         clustering_vq=True),
    "tatitok_bl64_vq": functools.partial(_vq8k, "base", "large", 64, text=True,
                                         clustering_vq=True),
    "tatitok_bl128_vq": functools.partial(_vq8k, "base", "large", 128, text=True,
                                          clustering_vq=True),
    "tatitok_bl32_vae": functools.partial(_vae, "base", "large", 32, text=True),
    "tatitok_bl64_vae": functools.partial(_vae, "base", "large", 64, text=True),
    "tatitok_sl128_vae": functools.partial(_vae, "small", "large", 128, text=True),
}


def _table(rngs, shape, width, names):
  """A learned embedding table, init width^-0.5 * N(0, 1) (blocks.py)."""
  return nnx.Param(nnx.with_partitioning(
      lambda key, s: width ** -0.5 * jax.random.normal(key, s), names)(rngs.params(), shape))


def _trunc_normal(names):
  return nnx.with_partitioning(nnx.initializers.truncated_normal(0.02), names)


def _conv(cin, cout, kernel, rngs, dtype, strides=1, padding="SAME"):
  """A torch Conv2d (trunc-normal(0.02) weights, zero bias: TiTok._init_weights)."""
  return nnx.Conv(cin, cout, (kernel, kernel), strides=strides, padding=padding, dtype=dtype,
                  kernel_init=_trunc_normal((None, None, "conv_in", "conv_out")),
                  bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("conv_out",)),
                  rngs=rngs)


def _layer_norm(width, rngs, dtype):
  return nnx.LayerNorm(
      width, epsilon=1e-5, dtype=dtype, use_fast_variance=False, rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))


class Block(nnx.Module):
  """ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, width, heads, *, rngs, dtype):
    self.ln_1 = _layer_norm(width, rngs, dtype)
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
    self.ln_2 = _layer_norm(width, rngs, dtype)
    self.mlp = layers.Mlp(width, 4 * width, approximate_gelu=False, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class ViT(nnx.Module):
  """ln_pre, the blocks, ln_post (applied by the caller to the positions it keeps)."""

  def __init__(self, width, depth, heads, *, rngs, dtype):
    self.ln_pre = _layer_norm(width, rngs, dtype)
    self.transformer = nnx.List([Block(width, heads, rngs=rngs, dtype=dtype)
                                 for _ in range(depth)])
    self.ln_post = _layer_norm(width, rngs, dtype)

  def blocks(self, x):
    x = self.ln_pre(x)
    for block in self.transformer:
      x = block(x)
    return x


class Encoder(ViT):
  """images [B, R, R, C] in [0, 1], latent_tokens [N, W] -> [B, N, token channels]."""

  def __init__(self, c, *, rngs, dtype):
    w = c.enc_width
    super().__init__(w, c.enc_depth, c.enc_heads, rngs=rngs, dtype=dtype)
    grid = c.resolution // c.patch_size
    self.width, self.legacy = w, c.legacy
    self.patch_embed = _conv(c.channels, w, c.patch_size, rngs, dtype, c.patch_size, "VALID")
    self.class_embedding = _table(rngs, (1, w), w, (None, "embed"))
    self.positional_embedding = _table(rngs, (grid * grid + 1, w), w, (None, "embed"))
    self.latent_token_positional_embedding = _table(rngs, (c.num_latent_tokens, w), w,
                                                    (None, "embed"))
    out = c.token_size * (2 if c.quantize == "vae" else 1)
    self.conv_out = _conv(w, out, 1, rngs, dtype)

  def __call__(self, images, latent_tokens):
    b, n = images.shape[0], latent_tokens.shape[0]
    x = self.patch_embed(images).reshape(b, -1, self.width)
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...]
    latents = latent_tokens + self.latent_token_positional_embedding[...]
    x = jnp.concatenate([x, jnp.broadcast_to(latents, (b, n, self.width))], axis=1)
    x = self.ln_post(self.blocks(x)[:, -n:])
    if self.legacy:  # torch: latent_tokens.reshape(B, W, N, 1), a reinterpretation of memory
      x = x.reshape(b, self.width, n).transpose(0, 2, 1)
    return self.conv_out(x[:, :, None, :])[:, :, 0, :]


class Decoder(ViT):
  """tokens [B, N, token_size] (+ text [B, 77, 768]) -> legacy: logits [B, g, g, 1024] over the
  MaskGIT-VQGAN codebook; non-legacy: images [B, R, R, C] in [0, 1] (nominally)."""

  def __init__(self, c, *, rngs, dtype):
    w = c.dec_width
    super().__init__(w, c.dec_depth, c.dec_heads, rngs=rngs, dtype=dtype)
    self.grid, self.patch, self.width, self.legacy = (c.resolution // c.patch_size, c.patch_size,
                                                       w, c.legacy)
    self.channels = c.channels
    dense = functools.partial(layers.linear, dtype=dtype, rngs=rngs,
                              kernel_init=nnx.initializers.truncated_normal(0.02))
    self.decoder_embed = dense(c.token_size, w, (None, "embed"))
    self.class_embedding = _table(rngs, (1, w), w, (None, "embed"))
    self.positional_embedding = _table(rngs, (self.grid ** 2 + 1, w), w, (None, "embed"))
    self.mask_token = _table(rngs, (1, 1, w), w, (None, None, "embed"))
    self.latent_token_positional_embedding = _table(rngs, (c.num_latent_tokens, w), w,
                                                    (None, "embed"))
    if c.text_context:
      self.text_guidance_proj = dense(c.text_dim, w, (None, "embed"))
      self.text_guidance_positional_embedding = _table(rngs, (c.text_context, w), w,
                                                       (None, "embed"))
    if c.legacy:  # ffn.0, tanh, ffn.2
      self.ffn_in = _conv(w, 2 * w, 1, rngs, dtype)
      self.ffn_out = _conv(2 * w, c.pixel_codebook_size, 1, rngs, dtype)
    else:  # ffn.0, Rearrange, conv_out
      self.ffn_in = _conv(w, c.patch_size ** 2 * c.channels, 1, rngs, dtype)
      self.conv_out = _conv(c.channels, c.channels, 3, rngs, dtype)

  def __call__(self, tokens, text=None):
    b, n, _ = tokens.shape
    x = self.decoder_embed(tokens) + self.latent_token_positional_embedding[:n]
    masks = jnp.concatenate([
        jnp.broadcast_to(self.class_embedding[...], (b, 1, self.width)),
        jnp.broadcast_to(self.mask_token[...], (b, self.grid ** 2, self.width))], axis=1)
    x = jnp.concatenate([masks + self.positional_embedding[...], x], axis=1)
    if text is not None:
      x = jnp.concatenate([x, self.text_guidance_proj(text)
                           + self.text_guidance_positional_embedding[...]], axis=1)
    x = self.ln_post(self.blocks(x)[:, 1:1 + self.grid ** 2])
    x = x.reshape(b, self.grid, self.grid, self.width)
    if self.legacy:
      return self.ffn_out(jnp.tanh(self.ffn_in(x)))
    g, p, ch = self.grid, self.patch, self.channels
    x = self.ffn_in(x).reshape(b, g, g, p, p, ch)  # channels (p1, p2, c)
    return self.conv_out(x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, ch))


class TiTok(nnx.Module):
  """A TiTok / TA-TiTok tokenizer (the interface of tokenizers/tokenizer.py): token ids [N]
  int32 (VQ) or latents [N, token_size] float32 (VAE) per image. TA-TiTok's decoder also takes
  the 77 x 768 CLIP text features of a caption: `decode(latents, text)`."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    if c.quantize not in ("vq", "vae"):
      raise ValueError(f"quantize {c.quantize!r}: choose vq or vae")
    if c.finetune_decoder and not (c.legacy and c.quantize == "vq"):
      raise ValueError("finetune_decoder (the MaskGIT-VQGAN pixel decoder) needs a legacy VQ "
                       "TiTok")
    if c.resolution % c.patch_size:
      raise ValueError(f"resolution {c.resolution} is not divisible by patch {c.patch_size}")
    dtype = jnp.dtype(c.dtype)
    self.use_l2_norm, self.commitment_cost = c.use_l2_norm, c.commitment_cost
    self.legacy, self.finetune_decoder = c.legacy, c.finetune_decoder
    self.text_shape = (c.text_context, c.text_dim) if c.text_context else None
    self.resolution, self.channels = c.resolution, c.channels
    self.is_discrete = c.quantize == "vq"
    self.codebook_size = c.codebook_size if self.is_discrete else 0
    self.latent_dtype = np.int32 if self.is_discrete else np.float32
    n = c.num_latent_tokens
    self.latent_shape = (n,) if self.is_discrete else (n, c.token_size)
    self.latent_tokens = _table(rngs, (n, c.enc_width), c.enc_width, (None, "embed"))
    self.encoder = Encoder(c, rngs=rngs, dtype=dtype)
    self.decoder = Decoder(c, rngs=rngs, dtype=dtype)
    if self.is_discrete:
      self.codebook = maskgit_vqgan.codebook_param(rngs, c.codebook_size, c.token_size)
    if c.finetune_decoder:
      p = c.pixel
      maskgit_vqgan.check_widths(p)
      if (2 ** (len(p.ch_mult) - 1) != c.patch_size or p.resolution != c.resolution
          or p.in_channels != c.channels):
        raise ValueError(f"the pixel decoder (factor {2 ** (len(p.ch_mult) - 1)}, resolution "
                         f"{p.resolution}, {p.in_channels} channels) must paint the "
                         f"{c.patch_size}-patch grid at {c.resolution} in {c.channels} "
                         "channels")
      self.pixel_codebook = maskgit_vqgan.codebook_param(rngs, c.pixel_codebook_size,
                                                         p.z_channels)
      self.pixel_decoder = maskgit_vqgan.Decoder(p, rngs=rngs, dtype=dtype)

  # --- the pieces, for training -------------------------------------------------------------

  def encode_features(self, images):
    """Images [-1, 1] -> the encoder output [B, N, token_size] (VQ) or [B, N, 2 token_size]
    (VAE moments) before the bottleneck."""
    tokenizer.check_images(images, self.resolution, self.channels)
    return self.encoder((images + 1) / 2, self.latent_tokens[...])

  def quantize(self, z):
    """VQ of the encoder output: (z_q straight-through, ids, losses, distances)."""
    return quantizers.vector_quantize(z, self.codebook[...], self.use_l2_norm,
                                      self.commitment_cost)

  def decoder_output(self, latents, text=None):
    """The TiTok decoder on quantized (or VAE) latents [B, N, token_size]: legacy, the logits
    [B, g, g, 1024] over the MaskGIT-VQGAN codes (what stage 1 trains with cross-entropy);
    non-legacy, images in [0, 1]."""
    want = (self.latent_shape[0], self.decoder.decoder_embed.in_features)
    if tuple(latents.shape[1:]) != want:
      raise TesseraxError(f"latents of shape {tuple(latents.shape[1:])}; this TiTok decodes "
                          f"{want}")
    if self.text_shape and text is None:
      raise TesseraxError(f"TA-TiTok decodes with text features [B, {self.text_shape[0]}, "
                          f"{self.text_shape[1]}] (CLIP ViT-L/14 text tokens); none given")
    if text is not None:
      if not self.text_shape:
        raise TesseraxError("this TiTok takes no text features (only TA-TiTok does)")
      if tuple(text.shape[1:]) != self.text_shape:
        raise TesseraxError(f"text features of shape {tuple(text.shape[1:])}; TA-TiTok takes "
                            f"[B, {self.text_shape[0]}, {self.text_shape[1]}]")
    return self.decoder(latents, text)

  def decode_latents(self, latents, text=None):
    """Quantized (or VAE) latents [B, N, token_size] -> images in [-1, 1] (nominally)."""
    out = self.decoder_output(latents, text)
    if self.legacy:
      if not self.finetune_decoder:
        raise TesseraxError("this legacy TiTok has no pixel decoder (finetune_decoder=False, "
                            "stage 1): decode its logits' argmax with the MaskGIT-VQGAN")
      mixed = jnp.einsum("bhwk,kd->bhwd", jax.nn.softmax(out.astype(jnp.float32), axis=-1),
                         self.pixel_codebook[...])
      out = self.pixel_decoder(mixed.astype(out.dtype))
    return out * 2 - 1

  # --- the tokenizer interface --------------------------------------------------------------

  def encode(self, images, keys=None):
    """Images [-1, 1] -> token ids [B, N] (VQ), or latents [B, N, C] (VAE): the posterior mean,
    or with per-example keys [B] a posterior sample."""
    z = self.encode_features(images)
    if self.is_discrete:
      return self.quantize(z)[1]
    mean, logvar = quantizers.gaussian_posterior(z)
    return mean if keys is None else jax.vmap(kl_autoencoder.sample)(mean, logvar, keys)

  def decode(self, latents, text=None):
    """Token ids [B, N] (through the codebook, l2-normalised where the model normalises) or VAE
    latents [B, N, C] -> images in [-1, 1] (nominally)."""
    if self.is_discrete:
      maskgit_vqgan.check_ids(latents, self.codebook_size, self.latent_shape)
      latents = quantizers.codebook_entry(self.codebook[...], latents, self.use_l2_norm)
    return self.decode_latents(latents, text)

  def __call__(self, images, text=None, key=None):
    """The training forward (TiTok.forward): (decoder output, aux). The output is images in
    [-1, 1], or for a legacy model without pixel decoder (stage 1) the logits over the
    MaskGIT-VQGAN codes. aux: VQ {"ids", "distances", "features" (the unquantized encoder
    output), "quantizer_loss", "commitment_loss", "codebook_loss"}; VAE {"mean", "logvar", "kl"}, the decoder fed a posterior sample (`key`)
    or the mean (key None)."""
    z = self.encode_features(images)
    if self.is_discrete:
      latents, ids, losses, d = self.quantize(z)
      aux = dict(losses, ids=ids, distances=d, features=z)
    else:
      mean, logvar = quantizers.gaussian_posterior(z)
      latents = kl_autoencoder.sample(mean, logvar, key)
      aux = {"mean": mean, "logvar": logvar, "kl": quantizers.gaussian_kl(mean, logvar)}
    if self.legacy and not self.finetune_decoder:
      return self.decoder_output(latents, text), aux
    return self.decode_latents(latents, text), aux


def proxy_code_loss(logits, codes):
  """Stage-1 cross-entropy (TiTok §3.3, "proxy codes"; ReconstructionLoss_Stage1): the legacy
  decoder's logits [B, g, g, K] against the frozen MaskGIT-VQGAN's codes [B, g, g] of the same
  images, averaged over every position."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, codes[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def stage1_loss(model: TiTok, proxy: maskgit_vqgan.MaskGitVQGAN, images, quantizer_weight=1.0):
  """(loss, metrics) of the two-stage recipe's first stage (configs/training/TiTok/stage1):
  proxy_code_loss of the legacy TiTok without pixel decoder (finetune_decoder=False) against
  `proxy`'s codes, + quantizer_weight * the VQ loss. `proxy` is frozen (no gradient)."""
  if not model.legacy or model.finetune_decoder:
    raise TesseraxError("stage 1 trains a legacy TiTok without pixel decoder "
                        "(legacy=True, finetune_decoder=False)")
  grid, k = model.decoder.grid, model.decoder.ffn_out.out_features
  if proxy.latent_shape != (grid, grid) or proxy.codebook_size != k:
    raise TesseraxError(f"the proxy tokenizer gives {proxy.latent_shape} codes of "
                        f"{proxy.codebook_size}; this TiTok predicts {(grid, grid)} of {k}")
  codes = jax.lax.stop_gradient(proxy.encode(images))
  logits, aux = model(images)
  ce = proxy_code_loss(logits, codes)
  loss = ce + quantizer_weight * aux["quantizer_loss"]
  return loss, {"loss": loss, "proxy_ce": ce, "quantizer_loss": aux["quantizer_loss"],
                "commitment_loss": aux["commitment_loss"], "codebook_loss": aux["codebook_loss"],
                "proxy_accuracy": jnp.mean(jnp.argmax(logits, -1) == codes)}


def pixel_params(vqgan_params: dict) -> dict:
  """The `pixel_codebook` and `pixel_decoder.*` parameters of a stage-2 TiTok from a
  MaskGIT-VQGAN's flat params (train_utils.py: the VQGAN's quantize and decoder weights loaded
  under a "pixel_" prefix; its encoder is not used)."""
  return {("pixel_codebook" if k == "codebook" else "pixel_" + k): v
          for k, v in vqgan_params.items() if not k.startswith("encoder.")}


def build(config, seed=0) -> TiTok:
  return TiTok(config, rngs=nnx.Rngs(seed))


registry.TOKENIZERS.register("titok", TiTok)
