"""TiTok / TA-TiTok, the MaskGIT-VQGAN and their converters against an independent float64 NumPy
forward pass written here from bytedance/1d-tokenizer modeling/titok.py, modeling/tatitok.py,
modeling/modules/blocks.py, modeling/modules/maskgit_vqgan.py and
modeling/quantizer/quantizer.py, operating directly on the official (torch-layout, NCHW) state
dict. Synthetic checkpoints of tiny configs (the official key names, small widths) are written
as safetensors, converted, loaded, and compared."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from tesserax.backbones import weights
from tesserax.convert import titok_checkpoints, torch_reader
from tesserax.core import config as config_lib, registry
from tesserax.core.errors import TesseraxError
from tesserax.tokenizers import maskgit_vqgan, quantizers, titok, titok_losses, tokenizer

RTOL = 1e-5

# --------------------------------------------------------------- the official state dict (tiny)


def vit_shapes(prefix, w, depth):
  shapes = {f"{prefix}.ln_pre.weight": (w,), f"{prefix}.ln_pre.bias": (w,),
            f"{prefix}.ln_post.weight": (w,), f"{prefix}.ln_post.bias": (w,)}
  for i in range(depth):
    p = f"{prefix}.transformer.{i}"
    shapes.update({
        f"{p}.ln_1.weight": (w,), f"{p}.ln_1.bias": (w,),
        f"{p}.attn.in_proj_weight": (3 * w, w), f"{p}.attn.in_proj_bias": (3 * w,),
        f"{p}.attn.out_proj.weight": (w, w), f"{p}.attn.out_proj.bias": (w,),
        f"{p}.ln_2.weight": (w,), f"{p}.ln_2.bias": (w,),
        f"{p}.mlp.c_fc.weight": (4 * w, w), f"{p}.mlp.c_fc.bias": (4 * w,),
        f"{p}.mlp.c_proj.weight": (w, 4 * w), f"{p}.mlp.c_proj.bias": (w,)})
  return shapes


def resblock_shapes(p, cin, cout):
  shapes = {f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,),
            f"{p}.conv1.weight": (cout, cin, 3, 3), f"{p}.norm2.weight": (cout,),
            f"{p}.norm2.bias": (cout,), f"{p}.conv2.weight": (cout, cout, 3, 3)}
  if cin != cout:
    shapes[f"{p}.nin_shortcut.weight"] = (cout, cout, 1, 1)
  return shapes


def vqgan_decoder_shapes(prefix, ch, mult, blocks, z):
  widths = [ch * m for m in mult]
  shapes = {f"{prefix}.conv_in.weight": (widths[-1], z, 3, 3),
            f"{prefix}.conv_in.bias": (widths[-1],),
            f"{prefix}.norm_out.weight": (ch,), f"{prefix}.norm_out.bias": (ch,),
            f"{prefix}.conv_out.weight": (3, ch, 3, 3), f"{prefix}.conv_out.bias": (3,)}
  for j in range(blocks):
    shapes.update(resblock_shapes(f"{prefix}.mid.{j}", widths[-1], widths[-1]))
  for i in range(len(widths)):
    cin = widths[min(i + 1, len(widths) - 1)]
    for j in range(blocks):
      shapes.update(resblock_shapes(f"{prefix}.up.{i}.block.{j}", cin if j == 0 else widths[i],
                                    widths[i]))
    if i:
      shapes[f"{prefix}.up.{i}.upsample_conv.weight"] = (widths[i], widths[i], 3, 3)
      shapes[f"{prefix}.up.{i}.upsample_conv.bias"] = (widths[i],)
  return shapes


def vqgan_shapes(ch, mult, blocks, z, k):
  widths = [ch * m for m in mult]
  shapes = {"encoder.conv_in.weight": (ch, 3, 3, 3),
            "encoder.norm_out.weight": (widths[-1],), "encoder.norm_out.bias": (widths[-1],),
            "encoder.conv_out.weight": (z, widths[-1], 1, 1), "encoder.conv_out.bias": (z,),
            "quantize.embedding.weight": (k, z)}
  for i in range(len(widths)):
    for j in range(blocks):
      shapes.update(resblock_shapes(f"encoder.down.{i}.block.{j}",
                                    ([ch] + widths)[i] if j == 0 else widths[i], widths[i]))
  for j in range(blocks):
    shapes.update(resblock_shapes(f"encoder.mid.{j}", widths[-1], widths[-1]))
  shapes.update(vqgan_decoder_shapes("decoder", ch, mult, blocks, z))
  return shapes


def titok_shapes(c):
  """The official state-dict shapes of TiTok / TATiTok under the config `c`."""
  ew, dw, n, cs, g = c.enc_width, c.dec_width, c.num_latent_tokens, c.token_size, (
      c.resolution // c.patch_size)
  out = cs * (2 if c.quantize == "vae" else 1)
  shapes = {"latent_tokens": (n, ew), "encoder.class_embedding": (1, ew),
            "encoder.positional_embedding": (g * g + 1, ew),
            "encoder.latent_token_positional_embedding": (n, ew),
            "encoder.patch_embed.weight": (ew, 3, c.patch_size, c.patch_size),
            "encoder.patch_embed.bias": (ew,), "encoder.conv_out.weight": (out, ew, 1, 1),
            "encoder.conv_out.bias": (out,),
            "decoder.class_embedding": (1, dw), "decoder.positional_embedding": (g * g + 1, dw),
            "decoder.mask_token": (1, 1, dw), "decoder.latent_token_positional_embedding": (n, dw),
            "decoder.decoder_embed.weight": (dw, cs), "decoder.decoder_embed.bias": (dw,)}
  shapes.update(vit_shapes("encoder", ew, c.enc_depth))
  shapes.update(vit_shapes("decoder", dw, c.dec_depth))
  if c.text_context:
    shapes.update({"decoder.text_guidance_proj.weight": (dw, c.text_dim),
                   "decoder.text_guidance_proj.bias": (dw,),
                   "decoder.text_guidance_positional_embedding": (c.text_context, dw)})
  if c.quantize == "vq":
    shapes["quantize.embedding.weight"] = (c.codebook_size, cs)
  if c.legacy:
    k = c.pixel_codebook_size
    shapes.update({"decoder.ffn.0.weight": (2 * dw, dw, 1, 1), "decoder.ffn.0.bias": (2 * dw,),
                   "decoder.ffn.2.weight": (k, 2 * dw, 1, 1), "decoder.ffn.2.bias": (k,),
                   "pixel_quantize.embedding.weight": (k, c.pixel.z_channels)})
    shapes.update(vqgan_decoder_shapes("pixel_decoder", c.pixel.ch, c.pixel.ch_mult,
                                       c.pixel.num_res_blocks, c.pixel.z_channels))
  else:
    shapes.update({"decoder.ffn.0.weight": (c.patch_size ** 2 * 3, dw, 1, 1),
                   "decoder.ffn.0.bias": (c.patch_size ** 2 * 3,),
                   "decoder.conv_out.weight": (3, 3, 3, 3), "decoder.conv_out.bias": (3,)})
  return shapes


def random_state_dict(shapes, seed):
  """Random values; norm weights around 1, everything else of a scale that keeps the
  activations O(1)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for k, s in shapes.items():
    if "norm" in k or ".ln_" in k:
      v = (1.0 if k.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(s)
    elif k.endswith("embed_prob"):
      v = rng.uniform(0, 1e-3, s)
    else:
      fan_in = int(np.prod(s[1:])) if len(s) > 1 and "embedding" not in k else 1
      v = rng.standard_normal(s) / math.sqrt(max(fan_in, 1)) * (0.5 if len(s) > 1 else 0.1)
    sd[k] = v.astype(np.float32)
  return sd


# ------------------------------------------------------------------ NumPy float64 oracle (NCHW)


def conv(x, w, b=None, stride=1, pad=None):
  k = w.shape[-1]
  pad = k // 2 if pad is None else pad
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out if b is None else out + b[None, :, None, None]


def group_norm(x, g, b):
  n, c, h, w = x.shape
  y = x.reshape(n, 32, -1)
  y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
  return y.reshape(n, c, h, w) * g[None, :, None, None] + b[None, :, None, None]


def layer_norm(x, g, b):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b


def silu(x):
  return x / (1 + np.exp(-x))


def softmax(x, axis):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Oracle:
  """Official forward passes over a float64 copy of a state dict."""

  def __init__(self, sd, heads=2):
    self.sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    self.heads = heads

  def __getitem__(self, key):
    return self.sd[key]

  def block(self, x, p):
    """ResidualAttentionBlock on [B, L, W] (nn.MultiheadAttention, packed in_proj)."""
    b, t, w = x.shape
    h, d = self.heads, w // self.heads
    y = layer_norm(x, self[f"{p}.ln_1.weight"], self[f"{p}.ln_1.bias"])
    qkv = y @ self[f"{p}.attn.in_proj_weight"].T + self[f"{p}.attn.in_proj_bias"]
    q, k, v = (qkv[..., i * w:(i + 1) * w].reshape(b, t, h, d).transpose(0, 2, 1, 3)
               for i in range(3))
    a = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d), -1) @ v
    a = a.transpose(0, 2, 1, 3).reshape(b, t, w)
    x = x + a @ self[f"{p}.attn.out_proj.weight"].T + self[f"{p}.attn.out_proj.bias"]
    y = layer_norm(x, self[f"{p}.ln_2.weight"], self[f"{p}.ln_2.bias"])
    y = y @ self[f"{p}.mlp.c_fc.weight"].T + self[f"{p}.mlp.c_fc.bias"]
    y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
    return x + y @ self[f"{p}.mlp.c_proj.weight"].T + self[f"{p}.mlp.c_proj.bias"]

  def vit(self, x, prefix):
    x = layer_norm(x, self[f"{prefix}.ln_pre.weight"], self[f"{prefix}.ln_pre.bias"])
    i = 0
    while f"{prefix}.transformer.{i}.ln_1.weight" in self.sd:
      x = self.block(x, f"{prefix}.transformer.{i}")
      i += 1
    return x

  def titok_encoder(self, x01, legacy):
    """TiTokEncoder.forward: [B, 3, R, R] in [0, 1] -> [B, token channels, 1, N]."""
    b = x01.shape[0]
    pw = self["encoder.patch_embed.weight"]
    p, w = pw.shape[-1], pw.shape[0]
    x = conv(x01, pw, self["encoder.patch_embed.bias"], stride=p, pad=0)
    x = x.reshape(b, w, -1).transpose(0, 2, 1)
    x = np.concatenate([np.broadcast_to(self["encoder.class_embedding"], (b, 1, w)), x], 1)
    x = x + self["encoder.positional_embedding"]
    lat = self["latent_tokens"] + self["encoder.latent_token_positional_embedding"]
    n = lat.shape[0]
    x = np.concatenate([x, np.broadcast_to(lat, (b, n, w))], 1)
    x = self.vit(x, "encoder")
    lat = layer_norm(x[:, -n:], self["encoder.ln_post.weight"], self["encoder.ln_post.bias"])
    if legacy:
      lat = lat.reshape(b, w, n, 1)
    else:
      lat = lat.reshape(b, n, w, 1).transpose(0, 2, 1, 3)
    out = conv(lat, self["encoder.conv_out.weight"], self["encoder.conv_out.bias"])
    return out.reshape(b, -1, 1, n)

  def vq(self, z, l2):
    """VectorQuantizer.forward: z [B, C, 1, N] -> (z_q [B, C, 1, N], ids [B, N], loss)."""
    z = z.transpose(0, 2, 3, 1)
    e = self["quantize.embedding.weight"]
    if l2:
      z, e = normalize(z), normalize(e)
    d = (z ** 2).sum(-1, keepdims=True) + (e ** 2).sum(-1) - 2 * z @ e.T
    ids = d.argmin(-1)
    zq = e[ids]
    loss = 0.25 * np.mean((zq - z) ** 2) + np.mean((zq - z) ** 2)
    return zq.transpose(0, 3, 1, 2), ids[:, 0], loss

  def entry(self, ids, l2):
    e = self["quantize.embedding.weight"][ids]
    return (normalize(e) if l2 else e).transpose(0, 2, 1)[:, :, None, :]

  def titok_decoder(self, z, text=None):
    """TiTokDecoder / TATiTokDecoder.forward: z [B, C, 1, N] -> [B, 1024 or 3, ...]."""
    b, c, _, n = z.shape
    x = z.reshape(b, c, n).transpose(0, 2, 1)
    x = x @ self["decoder.decoder_embed.weight"].T + self["decoder.decoder_embed.bias"]
    w = x.shape[-1]
    g2 = self["decoder.positional_embedding"].shape[0] - 1
    g = int(round(math.sqrt(g2)))
    masks = np.concatenate([np.broadcast_to(self["decoder.class_embedding"], (b, 1, w)),
                            np.broadcast_to(self["decoder.mask_token"], (b, g2, w))], 1)
    masks = masks + self["decoder.positional_embedding"]
    x = x + self["decoder.latent_token_positional_embedding"][:n]
    x = np.concatenate([masks, x], 1)
    if text is not None:
      t = text @ self["decoder.text_guidance_proj.weight"].T
      t = t + self["decoder.text_guidance_proj.bias"]
      x = np.concatenate([x, t + self["decoder.text_guidance_positional_embedding"]], 1)
    x = self.vit(x, "decoder")[:, 1:1 + g2]
    x = layer_norm(x, self["decoder.ln_post.weight"], self["decoder.ln_post.bias"])
    x = x.transpose(0, 2, 1).reshape(b, w, g, g)
    x = conv(x, self["decoder.ffn.0.weight"], self["decoder.ffn.0.bias"])
    if "decoder.ffn.2.weight" in self.sd:
      return conv(np.tanh(x), self["decoder.ffn.2.weight"], self["decoder.ffn.2.bias"])
    p = int(round(math.sqrt(x.shape[1] // 3)))
    x = x.reshape(b, p, p, 3, g, g).transpose(0, 3, 4, 1, 5, 2).reshape(b, 3, g * p, g * p)
    return conv(x, self["decoder.conv_out.weight"], self["decoder.conv_out.bias"])

  def resblock(self, x, p):
    h = conv(silu(group_norm(x, self[f"{p}.norm1.weight"], self[f"{p}.norm1.bias"])),
             self[f"{p}.conv1.weight"])
    h = conv(silu(group_norm(h, self[f"{p}.norm2.weight"], self[f"{p}.norm2.bias"])),
             self[f"{p}.conv2.weight"])
    if f"{p}.nin_shortcut.weight" in self.sd:  # on the conv2 output (the MaskGIT quirk)
      return h + conv(h, self[f"{p}.nin_shortcut.weight"])
    return h + x

  def blocks(self, prefix):
    j = 0
    while f"{prefix}.{j}.conv1.weight" in self.sd:
      yield f"{prefix}.{j}"
      j += 1

  def vqgan_decoder(self, z, prefix):
    x = conv(z, self[f"{prefix}.conv_in.weight"], self[f"{prefix}.conv_in.bias"])
    for p in self.blocks(f"{prefix}.mid"):
      x = self.resblock(x, p)
    levels = sum(1 for k in self.sd if k.startswith(f"{prefix}.up.") and k.endswith(
        ".block.0.conv1.weight"))
    for i in reversed(range(levels)):
      for p in self.blocks(f"{prefix}.up.{i}.block"):
        x = self.resblock(x, p)
      if i:
        x = x.repeat(2, axis=2).repeat(2, axis=3)
        x = conv(x, self[f"{prefix}.up.{i}.upsample_conv.weight"],
                 self[f"{prefix}.up.{i}.upsample_conv.bias"])
    x = silu(group_norm(x, self[f"{prefix}.norm_out.weight"], self[f"{prefix}.norm_out.bias"]))
    return conv(x, self[f"{prefix}.conv_out.weight"], self[f"{prefix}.conv_out.bias"])

  def vqgan_encode(self, x01):
    x = conv(x01, self["encoder.conv_in.weight"])
    levels = sum(1 for k in self.sd if k.startswith("encoder.down.") and k.endswith(
        ".block.0.conv1.weight"))
    for i in range(levels):
      for p in self.blocks(f"encoder.down.{i}.block"):
        x = self.resblock(x, p)
      if i != levels - 1:
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).mean((3, 5))
    for p in self.blocks("encoder.mid"):
      x = self.resblock(x, p)
    x = silu(group_norm(x, self["encoder.norm_out.weight"], self["encoder.norm_out.bias"]))
    z = conv(x, self["encoder.conv_out.weight"], self["encoder.conv_out.bias"])
    z = z.transpose(0, 2, 3, 1)
    e = self["quantize.embedding.weight"]
    return ((z ** 2).sum(-1, keepdims=True) + (e ** 2).sum(-1) - 2 * z @ e.T).argmin(-1)

  def titok_decode(self, z, text=None):
    """TiTok.decode: images in [0, 1] [B, 3, R, R]."""
    out = self.titok_decoder(z, text)
    if "pixel_quantize.embedding.weight" in self.sd:
      mixed = np.einsum("nchw,cd->ndhw", softmax(out, 1), self["pixel_quantize.embedding.weight"])
      out = self.vqgan_decoder(mixed, "pixel_decoder")
    return out


# -------------------------------------------------------------------------------- fixtures

PIXEL = dict(resolution=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
             codebook_size=8, in_channels=3, dtype="float32")


def tiny(kind, **overrides):
  """A tiny config of `kind`'s family: 16x16 images, patch 4, width 32, 2 heads."""
  c = titok.CONFIGS[kind]()
  c.update(dict(resolution=16, patch_size=4, enc_width=32, enc_depth=1, enc_heads=2,
                dec_width=64, dec_depth=1, dec_heads=2, num_latent_tokens=5))
  c.pixel.update(PIXEL)
  c.pixel_codebook_size = 8
  if c.quantize == "vq":
    c.update(dict(token_size=6, codebook_size=16))
  else:
    c.token_size = 4
  if c.text_context:
    c.update(dict(text_context=3, text_dim=8))
  c.update(overrides)
  return c


def convert(tmp_path, kind, config, sd, name):
  src = str(tmp_path / f"{name}.safetensors")
  torch_reader.write(src, sd)
  out = titok_checkpoints.convert_titok(kind, src, str(tmp_path / name), config=config)
  return tokenizer.load(out)


def images(seed, n=2, r=16):
  return np.random.default_rng(seed).uniform(-1, 1, (n, r, r, 3)).astype(np.float32)


def rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@nnx.jit
def forward(model, x, text=None):
  """One compiled pass (eager dispatch would compile every op on its own): the encoding, the
  decoding of it, the training forward, and for VQ the quantized latents and their decoding."""
  z = model.encode_features(x)
  out = {"encoded": model.encode(x), "call": model(x, text)}
  out["decoded"] = model.decode(out["encoded"], text)
  if model.is_discrete:
    out["z_q"] = model.quantize(z)[0]
    out["decoded_z_q"] = model.decode_latents(out["z_q"], text)
  return out


def nhwc(x01):
  """An oracle [0, 1] NCHW image -> tesserax's [-1, 1] NHWC."""
  return x01.transpose(0, 2, 3, 1) * 2 - 1


@pytest.fixture(scope="session")
def legacy(tmp_path_factory):
  config = tiny("titok_l32", enc_depth=2)
  sd = random_state_dict(titok_shapes(config), seed=1)
  tok = convert(tmp_path_factory.mktemp("legacy"), "titok-l32", config, sd, "l32")
  return config, sd, tok, forward(tok.model, jnp.asarray(images(0)))


# ----------------------------------------------------------------------------------- tests


def test_legacy_vq_through_pixel_decoder_matches_numpy(legacy):
  config, sd, tok, got = legacy
  assert tok.family == "titok" and tok.model.is_discrete and tok.stats is None
  x = images(0)
  oracle = Oracle(sd)
  z = oracle.titok_encoder(x.transpose(0, 3, 1, 2).astype(np.float64) / 2 + 0.5, legacy=True)
  zq, ids, loss = oracle.vq(z, l2=True)
  assert got["encoded"].dtype == jnp.int32
  assert got["encoded"].shape == (2, config.num_latent_tokens)
  np.testing.assert_array_equal(np.asarray(got["encoded"]), ids)
  # Decoding ids (through the l2-normalised codebook) = the official decode of the quantized
  # latents, soft-mixed into the pixel codebook and painted by the MaskGIT-VQGAN decoder.
  want = nhwc(oracle.titok_decode(zq))
  assert rel(got["decoded"], want) < RTOL
  out, aux = got["call"]
  assert rel(out, want) < RTOL
  assert abs(float(aux["quantizer_loss"]) - loss) < RTOL * loss


def test_legacy_reshape_is_not_a_permute(legacy):
  """The legacy encoder output differs from the corrected (permuted) one on the same weights."""
  _, sd, _, _ = legacy
  x01 = images(3).transpose(0, 3, 1, 2).astype(np.float64) / 2 + 0.5
  oracle = Oracle(sd)
  assert rel(oracle.titok_encoder(x01, legacy=False), oracle.titok_encoder(x01, True)) > 0.1


def test_tatitok_vq_with_text_matches_numpy(tmp_path):
  """Non-legacy head (pixel shuffle (p1, p2, c) + conv_out), no l2 norm, 3 text tokens, and the
  clustering_vq `quantize.embed_prob` buffer consumed."""
  config = tiny("tatitok_bl32_vq")
  shapes = titok_shapes(config)
  shapes["quantize.embed_prob"] = (config.codebook_size,)
  sd = random_state_dict(shapes, seed=2)
  tok = convert(tmp_path, "tatitok-bl32-vq", config, sd, "ta")
  x = images(1)
  text = np.random.default_rng(5).standard_normal((2, 3, 8)).astype(np.float32)
  oracle = Oracle(sd)
  z = oracle.titok_encoder(x.transpose(0, 3, 1, 2).astype(np.float64) / 2 + 0.5, legacy=False)
  zq, ids, _ = oracle.vq(z, l2=False)
  got = forward(tok.model, jnp.asarray(x), jnp.asarray(text))
  np.testing.assert_array_equal(np.asarray(got["encoded"]), ids)
  want = nhwc(oracle.titok_decode(zq, text.astype(np.float64)))
  assert rel(got["decoded"], want) < RTOL
  with pytest.raises(TesseraxError, match="text features"):
    tok.model.decode(got["encoded"])


def test_vae_matches_numpy(tmp_path):
  config = tiny("titok_bl64_vae_c16")
  sd = random_state_dict(titok_shapes(config), seed=3)
  tok = convert(tmp_path, "titok-bl64-vae-c16", config, sd, "vae")
  assert not tok.model.is_discrete and tok.model.latent_shape == (5, 4)
  np.testing.assert_array_equal(tok.stats["std"], np.ones(4, np.float32))
  x = images(2)
  oracle = Oracle(sd)
  moments = oracle.titok_encoder(x.transpose(0, 3, 1, 2).astype(np.float64) / 2 + 0.5, False)
  mean, logvar = moments[:, :4], np.clip(moments[:, 4:], -30, 20)
  got = forward(tok.model, jnp.asarray(x))
  assert rel(got["encoded"], mean[:, :, 0].transpose(0, 2, 1)) < RTOL
  assert rel(got["decoded"], nhwc(oracle.titok_decode(mean))) < RTOL
  kl = np.mean(0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
  assert abs(float(got["call"][1]["kl"]) - kl) < RTOL * kl


def test_maskgit_vqgan_matches_numpy(tmp_path):
  config = maskgit_vqgan.maskgit_vqgan_f16()
  config.update(PIXEL)
  sd = random_state_dict(vqgan_shapes(32, (1, 2, 2), 1, 16, 8), seed=4)
  tok = convert(tmp_path, "maskgit-vqgan-f16-256", config, sd, "vqgan")
  assert tok.model.latent_shape == (4, 4) and tok.model.codebook_size == 8
  x = images(4)
  oracle = Oracle(sd)
  ids = oracle.vqgan_encode(x.transpose(0, 3, 1, 2).astype(np.float64) / 2 + 0.5)
  got = nnx.jit(lambda m, x: (m.encode(x), m.decode(m.encode(x))))(tok.model, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got[0]), ids)
  codes = oracle["quantize.embedding.weight"][ids].transpose(0, 3, 1, 2)
  assert rel(got[1], nhwc(oracle.vqgan_decoder(codes, "decoder"))) < RTOL


# Parameters in the official state dicts (bytedance/1d-tokenizer @942a96f, the configs of
# configs/infer/TiTok and configs/infer/TA-TiTok instantiated; TA-TiTok VQ without the
# `embed_prob` buffer). Cross-checked with the HF file sizes (e.g. B-64: 819 MB fp32).
OFFICIAL_PARAMS = {
    "titok_l32": 641_054_735, "titok_b64": 204_814_095, "titok_s128": 83_674_639,
    "titok_bl64_vq8k": 390_016_148, "titok_bl128_vq8k": 390_179_988,
    "titok_sl256_vq8k": 330_260_884, "titok_ll32_vae_c16": 606_879_604,
    "titok_bl64_vae_c16": 389_418_100, "titok_bl128_vae_c16": 389_581_940,
    "tatitok_bl32_vq": 390_800_532, "tatitok_bl64_vq": 390_882_452,
    "tatitok_bl128_vq": 391_046_292, "tatitok_bl32_vae": 390_202_484,
    "tatitok_bl64_vae": 390_284_404, "tatitok_sl128_vae": 330_275_188,
}


def _count(factory):
  return sum(int(np.prod(x.shape)) for _, x in nnx.to_flat_state(
      nnx.state(nnx.eval_shape(factory), nnx.Param)))


def test_parameter_counts_of_released_configs():
  """Shapes only (eval_shape). Each config is built with one encoder and one decoder block;
  the other blocks are counted from a block of its width (every block of a ViT is the same)."""
  block = {w: _count(lambda w=w: titok.Block(w, 8, rngs=nnx.Rngs(0), dtype=jnp.float32))
           for w, _, _ in titok.VIT_SIZES.values()}
  for name, make in titok.CONFIGS.items():
    c = make()
    depths = (c.enc_depth, c.dec_depth)
    c.enc_depth = c.dec_depth = 1
    total = (_count(lambda c=c: titok.build(c)) + (depths[0] - 1) * block[c.enc_width]
             + (depths[1] - 1) * block[c.dec_width])
    assert total == OFFICIAL_PARAMS[name], name


# ------------------------------------------------------------------------------ quantizer


def test_straight_through_gradient_is_identity():
  rng = np.random.default_rng(3)
  z, codebook, w = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                    for s in ((3, 5, 6), (16, 6), (3, 5, 6)))
  grad = jax.jit(jax.grad(
      lambda z: jnp.sum(w * quantizers.vector_quantize(z, codebook, False)[0])))(z)
  np.testing.assert_allclose(grad, w, rtol=0, atol=0)


def test_commitment_loss_formula_and_codebook_gradient():
  rng = np.random.default_rng(0)
  z, e = rng.standard_normal((4, 7, 6)), rng.standard_normal((16, 6))
  for l2 in (False, True):
    zn, en = (normalize(z), normalize(e)) if l2 else (z, e)
    zq = en[((zn[..., None, :] - en) ** 2).sum(-1).argmin(-1)]
    _, _, losses, _ = jax.jit(quantizers.vector_quantize, static_argnums=2)(
        jnp.asarray(z, jnp.float32), jnp.asarray(e, jnp.float32), l2)
    mse = np.mean((zq - zn) ** 2)
    np.testing.assert_allclose(losses["commitment_loss"], 0.25 * mse, rtol=1e-5)
    np.testing.assert_allclose(losses["codebook_loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(losses["quantizer_loss"], 1.25 * mse, rtol=1e-5)
  # The codebook term pulls entries towards sg[z]: d/de of mean((e_id - z)^2) only.
  g = jax.jit(jax.grad(lambda e: quantizers.vector_quantize(
      jnp.asarray(z, jnp.float32), e, False)[2]["codebook_loss"]))(jnp.asarray(e, jnp.float32))
  ids = ((z[..., None, :] - e) ** 2).sum(-1).argmin(-1).reshape(-1)
  want = np.zeros_like(e)
  np.add.at(want, ids, 2 * (e[ids] - z.reshape(-1, 6)) / z.size)
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


def test_decoding_ids_equals_decoding_quantized_latents(legacy):
  """The straight-through latents are the l2-normalised codebook rows of the ids (up to the
  rounding of z + (z_q - z)), and decode the same."""
  _, _, tok, got = legacy
  entries = quantizers.codebook_entry(tok.model.codebook[...], got["encoded"], True)
  np.testing.assert_allclose(np.linalg.norm(entries, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(got["z_q"], entries, rtol=0, atol=1e-6)
  assert rel(got["decoded"], np.asarray(got["decoded_z_q"], np.float64)) < RTOL


def test_cluster_codebook_update():
  rng = np.random.default_rng(1)
  k, c = 6, 3
  e, z = rng.standard_normal((k, c)), rng.standard_normal((10, c))
  prob = rng.uniform(0, 0.02, k)
  d = ((z[:, None] - e) ** 2).sum(-1)
  ids = d.argmin(-1)
  new_e, new_prob = jax.jit(quantizers.cluster_codebook)(
      *(jnp.asarray(a) for a in (e, prob, z, ids, d)))
  want_prob = prob * 0.99 + np.bincount(ids, minlength=k) / 10 * 0.01
  decay = np.exp(-want_prob * k * 10 / 0.01 - 1e-3)[:, None]
  np.testing.assert_allclose(new_prob, want_prob, rtol=1e-6)
  np.testing.assert_allclose(new_e, e * (1 - decay) + z[d.argmin(0)] * decay, rtol=1e-5)


# ------------------------------------------------------------------------------- bad input


def test_bad_token_ids_are_refused(legacy):
  _, _, tok, _ = legacy
  with pytest.raises(TesseraxError, match=r"codebook has 16 entries"):
    tok.model.decode(jnp.full((1, 5), 16, jnp.int32))
  with pytest.raises(TesseraxError, match=r"decodes \(5,\) ids"):
    tok.model.decode(jnp.zeros((1, 4), jnp.int32))


def test_checkpoint_of_another_size_is_refused(tmp_path, legacy):
  _, sd, _, _ = legacy
  src = str(tmp_path / "l32.safetensors")
  torch_reader.write(src, sd)
  other = tiny("titok_l32", enc_width=64, num_latent_tokens=4)
  with pytest.raises(TesseraxError) as e:
    titok_checkpoints.convert_titok("titok-l32", src, str(tmp_path / "out"), config=other)
  message = str(e.value)
  assert "\n" not in message and "misshapen" in message and "latent_tokens (5, 32)" in message
  with pytest.raises(TesseraxError, match="missing .*unexpected"):
    titok_checkpoints.convert_titok("titok-bl64-vq8k", src, str(tmp_path / "out"),
                                    config=tiny("titok_bl64_vq8k"))


# ------------------------------------------------------------------------------ training


def random_model(factory, seed):
  """The network `factory` builds, holding random values (built from shapes: initialising it
  eagerly would compile every initialiser op on its own)."""
  shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(
      nnx.state(nnx.eval_shape(factory), nnx.Param))}
  rng = np.random.default_rng(seed)
  return weights.with_params(factory, {k: (0.3 * rng.standard_normal(s)).astype(np.float32)
                                       for k, s in shapes.items()})


def test_stage1_loss_is_cross_entropy_to_proxy_codes_plus_vq_loss():
  config = tiny("titok_l32", finetune_decoder=False)
  proxy_config = maskgit_vqgan.maskgit_vqgan_f16()
  proxy_config.update(PIXEL)
  model = random_model(lambda: titok.build(config), 8)
  proxy = random_model(lambda: maskgit_vqgan.MaskGitVQGAN(proxy_config, rngs=nnx.Rngs(1)), 9)
  x = jnp.asarray(images(7))

  @nnx.jit
  def run(model, proxy, x):
    loss, metrics = titok.stage1_loss(model, proxy, x)
    return loss, metrics, model(x), proxy.encode(x)

  loss, metrics, (logits, aux), codes = run(model, proxy, x)
  assert logits.shape == (2, 4, 4, 8) and codes.shape == (2, 4, 4)
  lg = np.asarray(logits, np.float64)
  logp = lg - lg.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ce = -np.mean(np.take_along_axis(logp, np.asarray(codes)[..., None], -1))
  np.testing.assert_allclose(metrics["proxy_ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + float(aux["quantizer_loss"]), rtol=1e-5)


def test_pixel_params_from_the_vqgan():
  config = tiny("titok_l32")
  vqgan = maskgit_vqgan.maskgit_vqgan_f16()
  vqgan.update(PIXEL)
  flat = lambda m: {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(
      nnx.state(nnx.eval_shape(m), nnx.Param))}
  pixel = titok.pixel_params(flat(lambda: maskgit_vqgan.MaskGitVQGAN(vqgan, rngs=nnx.Rngs(0))))
  model = flat(lambda: titok.build(config))
  assert pixel == {k: s for k, s in model.items() if k.startswith("pixel_")}


# ---------------------------------------------------------------------- MaskGIT generators

GENERATOR_OVERRIDES = {"model.hidden_size": "32", "model.num_layers": "2", "model.num_heads": "2",
                       "model.intermediate_size": "64", "model.codebook_size": "16",
                       "model.num_classes": "3", "model.seq_len": "5", "data.num_classes": "3",
                       "model.dropout": "0.0"}


def generator_shapes(c, bert):
  """The official state-dict shapes of ImageBert (HF BertModel under `model.`) / UViTBert."""
  d, f, vocab = c.hidden_size, c.intermediate_size, c.codebook_size + c.num_classes + 2
  if bert:
    shapes = {"model.embeddings.word_embeddings.weight": (vocab, d),
              "model.embeddings.position_embeddings.weight": (c.seq_len + 1, d),
              "model.embeddings.token_type_embeddings.weight": (2, d),
              "model.embeddings.LayerNorm.weight": (d,), "model.embeddings.LayerNorm.bias": (d,),
              "model.lm_head.weight": (c.codebook_size, d),
              "model.lm_head.bias": (c.codebook_size,)}
    for i in range(c.num_layers):
      p = f"model.encoder.layer.{i}"
      for name, shape in (("attention.self.query", (d, d)), ("attention.self.key", (d, d)),
                          ("attention.self.value", (d, d)), ("attention.output.dense", (d, d)),
                          ("intermediate.dense", (f, d)), ("output.dense", (d, f))):
        shapes[f"{p}.{name}.weight"], shapes[f"{p}.{name}.bias"] = shape, shape[:1]
      for name in ("attention.output.LayerNorm", "output.LayerNorm"):
        shapes[f"{p}.{name}.weight"] = shapes[f"{p}.{name}.bias"] = (d,)
    return shapes
  shapes = {"embeddings.weight": (vocab, d), "pos_embed": (1, c.seq_len + 1, d),
            "norm.weight": (d,), "norm.bias": (d,), "lm_head.weight": (c.codebook_size, d),
            "lm_head.bias": (c.codebook_size,)}
  half = c.num_layers // 2
  names = ([f"in_blocks.{i}" for i in range(half)] + ["mid_block"]
           + [f"out_blocks.{i}" for i in range(half)])
  for p in names:
    shapes.update({f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,),
                   f"{p}.attn.qkv.weight": (3 * d, d), f"{p}.attn.proj.weight": (d, d),
                   f"{p}.attn.proj.bias": (d,), f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,),
                   f"{p}.mlp.fc1.weight": (f, d), f"{p}.mlp.fc1.bias": (f,),
                   f"{p}.mlp.fc2.weight": (d, f), f"{p}.mlp.fc2.bias": (d,)})
    if p.startswith("out_blocks"):
      shapes.update({f"{p}.skip_linear.weight": (d, 2 * d), f"{p}.skip_linear.bias": (d,)})
  return shapes


def _ln(x, g, b, eps):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * g + b


def _gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _attention(q, k, v, heads):
  b, t, w = q.shape
  split = lambda x: x.reshape(b, t, heads, w // heads).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  a = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(w // heads), -1) @ v
  return a.transpose(0, 2, 1, 3).reshape(b, t, w)


def generator_oracle(sd, c, tokens, labels, bert):
  """ImageBert.forward / UViTBert.forward logits [B, N, codebook] (no dropout)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  lin = lambda x, p: x @ sd[f"{p}.weight"].T + (sd[f"{p}.bias"] if f"{p}.bias" in sd else 0)
  ids = np.concatenate([(labels + c.codebook_size + 1)[:, None], tokens], 1)
  h = c.num_heads
  if bert:
    e = "model.embeddings"
    x = (sd[f"{e}.word_embeddings.weight"][ids] + sd[f"{e}.position_embeddings.weight"][:6]
         + sd[f"{e}.token_type_embeddings.weight"][0])
    x = _ln(x, sd[f"{e}.LayerNorm.weight"], sd[f"{e}.LayerNorm.bias"], 1e-12)
    for i in range(c.num_layers):
      p = f"model.encoder.layer.{i}"
      a = _attention(*(lin(x, f"{p}.attention.self.{n}") for n in ("query", "key", "value")), h)
      x = _ln(x + lin(a, f"{p}.attention.output.dense"),
              sd[f"{p}.attention.output.LayerNorm.weight"],
              sd[f"{p}.attention.output.LayerNorm.bias"], 1e-12)
      y = lin(_gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense")
      x = _ln(x + y, sd[f"{p}.output.LayerNorm.weight"], sd[f"{p}.output.LayerNorm.bias"], 1e-12)
    return lin(x[:, 1:], "model.lm_head")

  def block(x, p, skip=None):
    if skip is not None:
      x = lin(np.concatenate([x, skip], -1), f"{p}.skip_linear")
    y = _ln(x, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-5)
    qkv = lin(y, f"{p}.attn.qkv")
    w = x.shape[-1]
    x = x + lin(_attention(qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:], h), f"{p}.attn.proj")
    y = _ln(x, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-5)
    return x + lin(_gelu(lin(y, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")

  x = sd["embeddings.weight"][ids] + sd["pos_embed"][:, :ids.shape[1]]
  skips = []
  for i in range(c.num_layers // 2):
    x = block(x, f"in_blocks.{i}")
    skips.append(x)
  x = block(x, "mid_block")
  for i in range(c.num_layers // 2):
    x = block(x, f"out_blocks.{i}", skips.pop())
  return lin(_ln(x, sd["norm.weight"], sd["norm.bias"], 1e-5)[:, 1:], "lm_head")


@pytest.mark.parametrize("kind", ["titok-generator-l32", "titok-generator-s128"])
def test_generator_converts_and_matches_numpy(tmp_path, kind):
  bert = kind.endswith("l32")
  config = titok_checkpoints.generator_config(kind, GENERATOR_OVERRIDES)
  sd = random_state_dict(generator_shapes(config.model, bert), seed=11)
  if bert:  # the buffer older transformers versions saved
    sd[titok_checkpoints.POSITION_IDS] = np.arange(6, dtype=np.int64)[None]
  src = str(tmp_path / "g.safetensors")
  torch_reader.write(src, sd)
  params = titok_checkpoints.generator_params(src, config.model, kind)
  network = registry.NETWORKS.get(config.model.name)
  model = weights.with_params(lambda: network(config.model, rngs=nnx.Rngs(0)), params)
  rng = np.random.default_rng(12)
  tokens = rng.integers(0, 17, (2, 5))  # 16 = [MASK]
  labels = np.array([1, 3])  # 3 = the null class
  got = nnx.jit(lambda m, t, l: m(t, l))(model, jnp.asarray(tokens, jnp.int32),
                                         jnp.asarray(labels, jnp.int32))
  assert rel(got, generator_oracle(sd, config.model, tokens, labels, bert)) < RTOL
  if bert:  # the workdir: the official sampling settings, the weights as params and EMA
    out = titok_checkpoints.convert_generator(kind, src, str(tmp_path / "wd"),
                                              GENERATOR_OVERRIDES)
    saved = config_lib.from_json(os.path.join(out, "config.json"))
    assert saved.task == "token_generator" and saved.model.name == "maskgit_bert"
    assert (saved.sample.guidance, saved.sample.guidance_scale, saved.sample.num_steps,
            saved.sample.randomize_temperature) == ("linear", 4.5, 8, 9.5)
    assert os.path.isdir(os.path.join(out, "checkpoints", "0"))
  del sd["lm_head.bias" if not bert else "model.lm_head.bias"]
  torch_reader.write(src, sd)
  with pytest.raises(TesseraxError, match="missing 1: .*lm_head.bias"):
    titok_checkpoints.generator_params(src, config.model, kind)


def test_maskbit_discriminator_matches_numpy():
  """Odd sides exercise the asymmetric TF-SAME pad of the blur pool (18 -> 9 -> 5)."""
  model = random_model(lambda: titok_losses.MaskBitDiscriminator(
      hidden=32, num_stages=2, pool_size=5, rngs=nnx.Rngs(0)), 15)
  x = np.random.default_rng(13).uniform(0, 1, (2, 18, 18, 3))
  got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x, jnp.float32))
  p = {k: np.asarray(v, np.float64) for k, v in tokenizer.flat_params(model).items()}
  w = lambda name: p[f"{name}.kernel"].transpose(3, 2, 0, 1)
  leaky = lambda y: np.where(y > 0, y, 0.1 * y)
  y = leaky(conv(x.transpose(0, 3, 1, 2), w("block_in"), p["block_in.bias"]))
  blur = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
  for i in range(2):
    y = conv(y, w(f"blocks.{i}"), p[f"blocks.{i}.bias"])
    n, c, h, _ = y.shape
    total = max((-(-h // 2) - 1) * 2 + 4 - h, 0)
    half = (total // 2, total - total // 2)
    y = np.pad(y, ((0, 0), (0, 0), half, half))
    y = conv(y.reshape(n * c, 1, *y.shape[2:]), blur[None, None], stride=2, pad=0)
    y = y.reshape(n, c, *y.shape[2:])
    g = y.reshape(n, 32, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    y = leaky(g.reshape(y.shape) * p[f"norms.{i}.scale"][None, :, None, None]
              + p[f"norms.{i}.bias"][None, :, None, None])
  assert y.shape[2:] == (5, 5)
  y = leaky(conv(y, w("to_logits_in"), p["to_logits_in.bias"]))
  want = conv(y, w("to_logits_out"), p["to_logits_out.bias"]).transpose(0, 2, 3, 1)
  assert rel(got, want) < RTOL


def test_stage2_losses():
  rng = np.random.default_rng(14)
  x, r = rng.uniform(0, 1, (2, 8, 8, 3)), rng.uniform(0, 1, (2, 8, 8, 3))
  fake, real = rng.standard_normal((2, 4, 4, 1)), rng.standard_normal((2, 4, 4, 1))
  for step, on in ((10, 0.0), (20_000, 1.0)):
    total, _ = titok_losses.stage2_generator_loss(x, r, 0.7, 0.2, fake, step)
    np.testing.assert_allclose(
        total, np.mean((x - r) ** 2) + 0.1 * 0.7 + 0.2 - on * 0.01 * fake.mean(), rtol=1e-5)
    loss, ema_r, ema_f = titok_losses.stage2_discriminator_loss(real, fake, 0.3, -0.2, step)
    hinge = 0.5 * (np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean())
    lecam = max(real.mean() + 0.2, 0) ** 2 + max(0.3 - fake.mean(), 0) ** 2
    np.testing.assert_allclose(loss, on * hinge + 0.001 * lecam, rtol=1e-5)
    np.testing.assert_allclose(ema_r, 0.3 * 0.999 + real.mean() * 0.001, rtol=1e-5)
    np.testing.assert_allclose(ema_f, -0.2 * 0.999 + fake.mean() * 0.001, rtol=1e-5)
