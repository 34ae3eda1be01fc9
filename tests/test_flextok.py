"""FlexTok: FSQ, the encoder, the rectified-flow decoder, nested dropout, APG and the converter,
against an independent float64 NumPy forward written here from apple/ml-flextok's modules
(layers/attention.py, layers/mlp.py, layers/transformer_blocks.py, preprocessors/*,
postprocessors/heads.py, utils/posembs.py, flow_matching/*), operating directly on an
official-layout state dict (torch [out, in] Linears, the official key names)."""
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tesserax.convert import flextok_checkpoints as fc
from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.sampling import flextok_decode
from tesserax.tokenizers import flextok, fsq, tokenizer

LEVELS = (8, 8, 8, 5, 5, 5)
D, HEAD_DIM, DEPTH, R, P, C, SIDE = 32, 16, 2, 8, 4, 1, 16  # width, ..., image side
GRID = SIDE // P
E, DEC = "encoder.module_dict.", "decoder.module_dict."


# --------------------------------------------------------------------- the official layout


def hydra():
  """A tiny FlexTok hydra config in the released layout (module_dict names, _target_s)."""
  t = lambda name, **kw: dict(_target_=f"flextok.model.{name}", **kw)
  trunk = dict(dim=D, depth=DEPTH, head_dim=HEAD_DIM, mlp_ratio=4.0)
  return {
      "_target_": "flextok.flextok_wrapper.FlexTok", "vae": None,
      "encoder": {"_target_": "flextok.model.utils.wrappers.SequentialModuleDictWrapper",
                  "module_dict": {
                      "enc_patch_emb": t("preprocessors.PatchEmbedder", patch_sizes=[P, P],
                                         channels_in=C, dim=D),
                      "enc_posemb_module": t("utils.posembs.PositionalEmbeddingAdder", dim=D,
                                             max_sizes=[GRID, GRID], posemb_type="sincos"),
                      "enc_register_module": t("preprocessors.Registers1D", n_min=R, n_max=R),
                      "enc_seq_packer": t("preprocessors.BlockWiseSequencePacker",
                                          mask_mode="causal_last", pad_to_multiple=128),
                      "enc_transformer": t("trunks.FlexTransformer", **trunk),
                      "enc_to_latents": t("postprocessors.LinearHead", dim=D, dim_out=6,
                                          use_mup_readout=False)}},
      "regularizer": {"_target_": "flextok.regularizers.FSQ", "levels": list(LEVELS)},
      "decoder": {"_target_": "flextok.model.utils.wrappers.SequentialModuleDictWrapper",
                  "module_dict": {
                      "dec_from_latents": t("preprocessors.LinearLayer", dim_in=6, dim=D),
                      "dec_registers_posemb_module": t(
                          "utils.posembs.PositionalEmbeddingAdder", dim=D, max_sizes=[R],
                          posemb_type="learnable_sum"),
                      "dec_nested_dropout": t("preprocessors.MaskedNestedDropout", dim=D),
                      "dec_latent_dropout": t("preprocessors.LearnedNullCond", dim=D),
                      "dec_noise_patch_emb": t("preprocessors.PatchEmbedder",
                                               patch_sizes=[P, P], channels_in=C, dim=D),
                      "dec_patches_posemb_module": t(
                          "utils.posembs.PositionalEmbeddingAdder", dim=D,
                          max_sizes=[GRID, GRID], posemb_type="sincos"),
                      "dec_time_embedder": t("preprocessors.TimestepEmbedder", dim=D,
                                             max_timestep=1.0),
                      "dec_transformer": t("trunks.FlexTransformer", adaLN_expansion=2,
                                           **trunk),
                      "dec_to_patches": t("postprocessors.ToPatchesLinearHead", dim=D,
                                          channels_out=C, patch_sizes=[P, P],
                                          use_mup_readout=False)}},
      "flow_matching_noise_module": {"_target_": "flextok.flow_matching.MinRFNoiseModule"},
      "pipeline": {"_target_": "flextok.flow_matching.MinRFPipeline", "_partial_": True}}


def official_posemb(dim, h, w):
  """utils/posembs.py build_2d_sincos_posemb: (1, dim, h, w)."""
  grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64),
                               indexing="ij")
  omega = 1.0 / 1e4 ** (np.arange(dim // 4) / (dim // 4))
  out_w, out_h = grid_w.reshape(-1)[:, None] * omega, grid_h.reshape(-1)[:, None] * omega
  emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], 1)
  return emb.reshape(h, w, dim).transpose(2, 0, 1)[None]


def state_dict(seed=0):
  """Random float32 values under the official key names and torch shapes."""
  rng = np.random.default_rng(seed)
  hidden = int(2 * 4 * D / 3)
  sd = {}

  def lin(name, dout, din, bias=True):
    sd[name + ".weight"] = rng.normal(0, 1 / np.sqrt(din), (dout, din))
    if bias:
      sd[name + ".bias"] = rng.normal(0, 0.1, (dout,))

  def trunk(prefix, adaln):
    for i in range(DEPTH):
      b = f"{prefix}.blocks.{i}."
      for name in ("wq", "wk", "wv", "proj"):
        lin(b + "attn." + name, D, D, bias=False)
      lin(b + "mlp.fc1", hidden, D, bias=False)
      lin(b + "mlp.fc3", hidden, D, bias=False)
      lin(b + "mlp.fc2", D, hidden, bias=False)
      if adaln:
        lin(b + "adaLN_modulation.1", 2 * 6 * D, D)

  lin(E + "enc_patch_emb.patch_proj", D, P * P * C)
  sd[E + "enc_posemb_module.posembs"] = official_posemb(D, GRID, GRID)
  sd[E + "enc_register_module.registers"] = rng.normal(0, 1, (R, D))
  trunk(E + "enc_transformer", False)
  lin(E + "enc_to_latents.proj", 6, D)
  lin(DEC + "dec_from_latents.proj", D, 6)
  sd[DEC + "dec_registers_posemb_module.posembs"] = rng.normal(0, 1, (1, 1, D, R))
  sd[DEC + "dec_nested_dropout.dropout_mask_token"] = rng.normal(0, 1, (D,))
  sd[DEC + "dec_latent_dropout.nullcond"] = rng.normal(0, 1, (D,))
  lin(DEC + "dec_noise_patch_emb.patch_proj", D, P * P * C)
  sd[DEC + "dec_patches_posemb_module.posembs"] = official_posemb(D, GRID, GRID)
  lin(DEC + "dec_time_embedder.mlp.0", D, 256)
  lin(DEC + "dec_time_embedder.mlp.2", D, D)
  trunk(DEC + "dec_transformer", True)
  lin(DEC + "dec_to_patches.adaLN_modulation.1", 2 * D, D)
  lin(DEC + "dec_to_patches.proj", P * P * C, D)
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def write_safetensors(path, sd, metadata):
  """The safetensors layout with a `__metadata__` of str values (checkpoint.py's
  save_safetensors stores str(value) per top-level config key)."""
  header, offset = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0
  for k, v in sd.items():
    header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset,
                                                                           offset + v.nbytes]}
    offset += v.nbytes
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for v in sd.values():
      f.write(np.ascontiguousarray(v).tobytes())


# ---------------------------------------------------------------- NumPy float64 oracle


def ln(x):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def silu(x):
  return x / (1 + np.exp(-x))


class Oracle:

  def __init__(self, sd):
    self.sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

  def lin(self, name, x):
    y = x @ self.sd[name + ".weight"].T
    return y + self.sd[name + ".bias"] if name + ".bias" in self.sd else y

  def attn(self, prefix, x, allowed):
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, D // HEAD_DIM, HEAD_DIM).transpose(0, 2, 1, 3)
    q, k, v = (heads(self.lin(prefix + n, x)) for n in ("wq", "wk", "wv"))
    logits = ln(q) @ ln(k).transpose(0, 1, 3, 2) * (8.0 / HEAD_DIM)
    logits = np.where(allowed, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out = (w / w.sum(-1, keepdims=True)) @ v
    return self.lin(prefix + "proj", out.transpose(0, 2, 1, 3).reshape(b, t, D))

  def mlp(self, prefix, x):
    return self.lin(prefix + "fc2", silu(self.lin(prefix + "fc1", x)) * self.lin(prefix + "fc3", x))

  @staticmethod
  def patches(x):
    """[B, S, S, C] -> [B, n0 n1, (p0 p1 c)], einops "(n0 p0) (n1 p1) d -> (n0 n1) (p0 p1 d)"."""
    out = np.zeros((x.shape[0], GRID * GRID, P * P * C))
    for n0 in range(GRID):
      for n1 in range(GRID):
        for p0 in range(P):
          for p1 in range(P):
            out[:, n0 * GRID + n1, (p0 * P + p1) * C:(p0 * P + p1 + 1) * C] = \
                x[:, n0 * P + p0, n1 * P + p1]
    return out

  @staticmethod
  def unpatches(y):
    out = np.zeros((y.shape[0], SIDE, SIDE, C))
    for n0 in range(GRID):
      for n1 in range(GRID):
        for p0 in range(P):
          for p1 in range(P):
            out[:, n0 * P + p0, n1 * P + p1] = \
                y[:, n0 * GRID + n1, (p0 * P + p1) * C:(p0 * P + p1 + 1) * C]
    return out

  def posemb(self, key):
    return self.sd[key][0].transpose(1, 2, 0).reshape(GRID * GRID, D)

  def encoder(self, x):
    n = GRID * GRID
    h = self.lin(E + "enc_patch_emb.patch_proj", self.patches(x))
    h = h + self.posemb(E + "enc_posemb_module.posembs")
    regs = np.broadcast_to(self.sd[E + "enc_register_module.registers"], (x.shape[0], R, D))
    h = np.concatenate([h, regs], 1)
    q, k = np.arange(n + R)[:, None], np.arange(n + R)[None]
    allowed = (k < n) | ((q >= n) & (k <= q))  # prefix: patches; registers causal
    for i in range(DEPTH):
      b = f"{E}enc_transformer.blocks.{i}."
      h = h + self.attn(b + "attn.", ln(h), allowed)
      h = h + self.mlp(b + "mlp.", ln(h))
    return self.lin(E + "enc_to_latents.proj", ln(h[:, n:]))

  @staticmethod
  def fsq(z):
    levels = np.asarray(LEVELS, np.float64)
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    bounded = np.tanh(z + np.arctanh(offset / half_l)) * half_l - offset
    codes = np.round(bounded) / (levels // 2)
    digits = np.round(codes * (levels // 2) + levels // 2).astype(np.int64)
    return codes, (digits * np.array([1, 8, 64, 512, 2560, 12800])).sum(-1)

  def velocity(self, x_t, t, codes, keep_k, null):
    n = GRID * GRID
    b = x_t.shape[0]
    r = self.lin(DEC + "dec_from_latents.proj", codes)
    r = r + self.sd[DEC + "dec_registers_posemb_module.posembs"][0, 0].T
    for i in range(b):
      r[i, keep_k[i]:] = self.sd[DEC + "dec_nested_dropout.dropout_mask_token"]
      if null[i]:
        r[i, :] = self.sd[DEC + "dec_latent_dropout.nullcond"]
    h = self.lin(DEC + "dec_noise_patch_emb.patch_proj", self.patches(x_t))
    h = np.concatenate([h + self.posemb(DEC + "dec_patches_posemb_module.posembs"), r], 1)
    freqs = (1000.0 / 1.0) * np.exp(-np.log(256.0) * np.arange(128) / 128)
    args = t[:, None] * freqs[None]
    temb = np.concatenate([np.cos(args), np.sin(args)], -1)
    temb = self.lin(DEC + "dec_time_embedder.mlp.2",
                    silu(self.lin(DEC + "dec_time_embedder.mlp.0", temb)))
    allowed = np.ones((n + R, n + R), bool)
    for i in range(DEPTH):
      blk = f"{DEC}dec_transformer.blocks.{i}."
      m = self.lin(blk + "adaLN_modulation.1", silu(temb)).reshape(b, 2, 6, D)
      per_token = np.concatenate([np.repeat(m[:, :1], n, 1), np.repeat(m[:, 1:], R, 1)], 1)
      g_msa, g_mlp, sh_msa, sc_msa, sh_mlp, sc_mlp = (per_token[:, :, j] for j in range(6))
      h = h + g_msa * self.attn(blk + "attn.", ln(h) * (1 + sc_msa) + sh_msa, allowed)
      h = h + g_mlp * self.mlp(blk + "mlp.", ln(h) * (1 + sc_mlp) + sh_mlp)
    shift, scale = np.split(self.lin(DEC + "dec_to_patches.adaLN_modulation.1", silu(temb)), 2, -1)
    out = ln(h[:, :n]) * (1 + scale[:, None]) + shift[:, None]
    return self.unpatches(self.lin(DEC + "dec_to_patches.proj", out))


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
  """(official state dict, the converted tokenizer directory loaded, the checkpoint path)."""
  root = tmp_path_factory.mktemp("flextok")
  sd = state_dict()
  src = str(root / "model.safetensors")
  write_safetensors(src, sd, hydra())
  directory = registry.CONVERTERS.get("flextok").convert("flextok", src, str(root / "tok"))
  return sd, tokenizer.load(directory), src


@pytest.fixture(scope="session")
def inputs():
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (2, SIDE, SIDE, C)).astype(np.float32)
  x_t = rng.normal(0, 1, (2, SIDE, SIDE, C)).astype(np.float32)
  return images, x_t


# --------------------------------------------------------------------------------- FSQ


def test_fsq_bijection_over_all_codes():
  size = fsq.codebook_size(LEVELS)
  assert size == 64000
  ids = jnp.arange(size, dtype=jnp.int32)
  codes = fsq.indices_to_codes(ids, LEVELS)
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(codes, LEVELS)), np.arange(size))
  assert len(np.unique(np.asarray(codes), axis=0)) == size
  # every code is a rounded quantizer output: quantize(atanh-preimage) gives it back
  half = np.array([l // 2 for l in LEVELS], np.float64)
  levels = np.asarray(LEVELS, np.float64)
  half_l = (levels - 1) * (1 + 1e-3) / 2
  offset = np.where(levels % 2 == 0, 0.5, 0.0)
  pre = np.arctanh((np.asarray(codes, np.float64) * half + offset) / half_l) - np.arctanh(
      offset / half_l)
  np.testing.assert_array_equal(np.asarray(fsq.quantize(jnp.asarray(pre, jnp.float32), LEVELS)),
                                np.asarray(codes))


def test_fsq_bound_and_straight_through():
  z = jnp.asarray(np.random.default_rng(2).normal(0, 2, (64, 6)), jnp.float32)
  levels = np.asarray(LEVELS, np.float64)
  half_l = (levels - 1) * (1 + 1e-3) / 2
  offset = np.where(levels % 2 == 0, 0.5, 0.0)
  zz = np.asarray(z, np.float64)
  want = np.tanh(zz + np.arctanh(offset / half_l)) * half_l - offset
  np.testing.assert_allclose(np.asarray(fsq.bound(z, LEVELS)), want, rtol=1e-6, atol=1e-6)
  # extremes round to exactly L levels: [-L/2, L/2 - 1] (even), [-(L-1)/2, (L-1)/2] (odd)
  lo, hi = (np.round(np.asarray(fsq.bound(jnp.full((6,), s), LEVELS))) for s in (-40.0, 40.0))
  np.testing.assert_array_equal(hi - lo + 1, LEVELS)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(64, 6)), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(jax.grad(lambda v: (w * fsq.round_ste(v)).sum())(z)), np.asarray(w))
  grad = jax.grad(lambda v: (w * fsq.quantize(v, LEVELS)).sum())(z)
  dbound = (1 - np.tanh(zz + np.arctanh(offset / half_l)) ** 2) * half_l
  np.testing.assert_allclose(np.asarray(grad), np.asarray(w) * dbound / (levels // 2),
                             rtol=1e-5, atol=1e-6)


# --------------------------------------------------------- converted checkpoint vs oracle


def test_converted_checkpoint_matches_numpy_forward(converted, inputs):
  sd, tok, _ = converted
  images, x_t = inputs
  model, oracle = tok.model, Oracle(sd)
  assert isinstance(model, flextok.FlexTok) and model.latent_shape == (R,)
  t = np.array([0.7, 0.25])
  keep_k, null = np.array([3, R]), np.array([False, True])

  @jax.jit
  def forward(images, x_t):
    codes, ids = model.quantize(images)
    v = model.velocity(x_t, jnp.asarray(t, jnp.float32), codes, jnp.asarray(keep_k),
                       jnp.asarray(null))
    return model.encoder(images), ids, model.encode(images), v

  z, ids, encoded, v = forward(jnp.asarray(images), jnp.asarray(x_t))
  z_ref = oracle.encoder(images.astype(np.float64))
  assert rel_err(z, z_ref) < 1e-5
  codes_ref, ids_ref = oracle.fsq(z_ref)
  np.testing.assert_array_equal(np.asarray(ids), ids_ref)
  np.testing.assert_array_equal(np.asarray(encoded), ids_ref)
  assert rel_err(v, oracle.velocity(x_t.astype(np.float64), t, codes_ref, keep_k, null)) < 1e-5


def test_nested_dropout_registers_past_keep_k_have_no_influence(converted, inputs):
  model = converted[1].model
  _, x_t = inputs
  codes = fsq.indices_to_codes(jnp.asarray(np.random.default_rng(4).integers(0, 64000, (2, R))),
                               LEVELS)
  keep_k = jnp.array([2, 5])
  t = jnp.array([0.5, 0.9])

  out = jax.jit(lambda c: model.velocity(jnp.asarray(x_t), t, c, keep_k))
  grad = np.asarray(jax.jit(jax.grad(lambda c: (out(c) ** 2).sum()))(codes))
  for i, k in enumerate([2, 5]):
    assert np.all(grad[i, k:] == 0.0)
    assert np.all(np.abs(grad[i, :k]).sum(-1) > 0)
  changed = codes.at[:, 5:].set(-codes[:, 5:])
  np.testing.assert_array_equal(np.asarray(out(codes)), np.asarray(out(changed)))


def test_decode_prefix_and_errors(converted, inputs):
  model = converted[1].model
  images, _ = inputs
  ids = model.encode(jnp.asarray(images))
  full = model.decode(ids, 3, steps=2, guidance_scale=2.0)
  prefix = model.decode(ids[:, :3], steps=2, guidance_scale=2.0)
  assert full.shape == (2, SIDE, SIDE, C)
  np.testing.assert_allclose(np.asarray(full), np.asarray(prefix), rtol=0, atol=1e-6)
  for bad, match in ((lambda: model.decode(ids, 0), "outside 1..8"),
                     (lambda: model.decode(ids, R + 1), "outside 1..8"),
                     (lambda: model.decode(ids[:, :3], 4), "outside 1..3"),
                     (lambda: model.decode(jnp.zeros((1, R + 1), jnp.int32)), "K in 1..8"),
                     (lambda: model.decode(ids.at[0, 1].set(64000)), "codebook"),
                     (lambda: model.decode(ids.at[0, 1].set(-1)), "codebook")):
    with pytest.raises(TesseraxError, match=match):
      bad()


# ------------------------------------------------------------------------- the converter


def test_converter_refuses_mismatched_header_and_unknown_module(converted, tmp_path):
  sd, _, _ = converted
  broken = dict(sd)
  del broken[E + "enc_transformer.blocks.1.attn.wk.weight"]
  broken[DEC + "dec_extra.weight"] = np.zeros(3, np.float32)
  broken[E + "enc_to_latents.proj.bias"] = np.zeros(5, np.float32)
  src = str(tmp_path / "broken.safetensors")
  write_safetensors(src, broken, hydra())
  with pytest.raises(TesseraxError) as e:
    fc.convert_flextok("flextok", src, str(tmp_path / "a"))
  message = str(e.value)
  assert "\n" not in message
  for part in ("missing 1: " + E + "enc_transformer.blocks.1.attn.wk.weight",
               "unexpected 1: " + DEC + "dec_extra.weight", "misshapen 1: " + E):
    assert part in message
  config = hydra()
  config["decoder"]["module_dict"]["dec_time_embedder"]["_target_"] = "os.system"
  src = str(tmp_path / "evil.safetensors")
  write_safetensors(src, sd, config)
  with pytest.raises(TesseraxError, match="unknown module 'os.system'"):
    fc.convert_flextok("flextok", src, str(tmp_path / "b"))
  config = hydra()
  config["encoder"]["module_dict"]["enc_transformer"]["qkv_bias"] = True
  write_safetensors(src, sd, config)
  with pytest.raises(TesseraxError, match="qkv_bias=True"):
    fc.convert_flextok("flextok", src, str(tmp_path / "c"))


def test_key_layout_and_parameter_count_at_released_width():
  """Width 768 (d12-d12's) at depth 2 with a small VAE: the official key names and shapes
  (spot keys of the released layout) and an analytic parameter count."""
  vae = dict(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
             z_channels=16, embed_dim=16, in_channels=3, dtype="float32")
  c = flextok.flextok_config("d12-d12", resolution=32, encoder_depth=2, decoder_depth=2)
  c.vae.update(vae)
  rules, buffers = fc.key_rules(c)
  shape = lambda k: fc.official_shape(rules[k][1], rules[k][2])
  assert shape("vae.vae.encoder.conv_in.weight") == (32, 3, 3, 3)
  assert shape("vae.vae.quant_conv.weight") == (32, 32, 1, 1)
  assert shape("vae.vae.post_quant_conv.weight") == (16, 16, 1, 1)
  assert shape("vae.vae.decoder.up_blocks.0.resnets.0.conv1.weight") == (64, 64, 3, 3)
  assert shape(DEC + "dec_transformer.blocks.1.adaLN_modulation.1.weight") == (2 * 6 * 768, 768)
  assert shape(DEC + "dec_registers_posemb_module.posembs") == (1, 1, 768, 256)
  assert shape(DEC + "dec_to_patches.proj.weight") == (2 * 2 * 16, 768)
  assert shape(E + "enc_transformer.blocks.1.mlp.fc1.weight") == (2048, 768)
  assert buffers[E + "enc_posemb_module.posembs"] == (768, 8)  # 32 / 2 (VAE) / 2 (patch)
  d, h, depth = 768, 2048, 2
  block = 4 * d * d + 3 * d * h
  enc = (64 * d + d) + 256 * d + depth * block + (6 * d + 6)
  dec = ((6 * d + d) + 256 * d + 2 * d + (64 * d + d) + (256 * d + d) + (d * d + d)
         + depth * (block + 12 * d * d + 12 * d) + (2 * d * d + 2 * d) + (64 * d + 64))
  counts = {k: int(np.prod(shape(k))) for k in rules}
  assert sum(v for k, v in counts.items() if k.startswith("encoder.")) == enc
  assert sum(v for k, v in counts.items() if k.startswith("decoder.")) == dec


# ---------------------------------------------------------------------------- guidance


def apg_reference(v_c, v_u, w, m):
  """arXiv 2410.02416 Alg. 1 with FlexTok's beta -0.5, r 2.5, eta 0 (float64)."""
  m = (v_c - v_u) - 0.5 * m
  d = m * min(1.0, 2.5 / np.linalg.norm(m))
  u = v_c / np.linalg.norm(v_c)
  return v_c + (w - 1) * (d - np.sum(d * u) * u), m


def test_apg_and_the_decoder_sampler_match_their_formulas():
  rng = np.random.default_rng(5)
  v_c, v_u = rng.normal(size=(2, 3, 4, 4, 2))
  m = np.zeros_like(v_c)
  got_m = jnp.zeros(v_c.shape, jnp.float32)
  for _ in range(2):  # the momentum carries over
    got, got_m = flextok_decode.apg(jnp.asarray(v_c, jnp.float32), jnp.asarray(v_u, jnp.float32),
                                    4.0, got_m)
    for i in range(3):
      want, m[i] = apg_reference(v_c[i], v_u[i], 4.0, m[i])
      np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-5, atol=1e-5)
  a = rng.normal(size=(2, 4, 4, 2))

  def velocity_fn(x, t, null):  # cond and null branches differ; t enters linearly
    return x * t[:, None, None, None] + jnp.where(null[:, None, None, None], 0.0, a.repeat(
        x.shape[0] // 2, 0).astype(np.float32))

  noise = rng.normal(size=(2, 4, 4, 2))
  for guidance in ("cfg", "apg"):
    got = flextok_decode.decode(velocity_fn, jnp.asarray(noise, jnp.float32), 4, 3.0, guidance)
    x, m = noise.copy(), np.zeros_like(noise)
    for i in range(4, 0, -1):
      t = i / 4
      v_c, v_u = x * t + a, x * t
      for j in range(2):
        if guidance == "cfg":
          v = v_u[j] + 3.0 * (v_c[j] - v_u[j])
        else:
          v, m[j] = apg_reference(v_c[j], v_u[j], 3.0, m[j])
        x[j] = x[j] - 0.25 * v
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- training


def test_keep_k_sampling_modes():
  key = jax.random.PRNGKey(0)
  uniform = np.asarray(flextok.sample_keep_k(key, 4000, 16, "uniform"))
  assert set(uniform.tolist()) == set(range(1, 17))
  pow2 = np.asarray(flextok.sample_keep_k(key, 4000, 16, "pow2"))
  assert set(pow2.tolist()) == {1, 2, 4, 8, 16}
  assert np.all(np.abs(np.bincount(pow2)[[1, 2, 4, 8, 16]] / 4000 - 0.2) < 0.03)
  rounded = np.asarray(flextok.sample_keep_k(key, 4000, 16, "uniform_pow2"))
  assert set(rounded.tolist()) == {1, 2, 4, 8, 16}
  assert abs(np.mean(rounded == 16) - 8 / 16) < 0.03  # k in 9..16 rounds up to 16
  with pytest.raises(TesseraxError, match="power-of-two"):
    flextok.sample_keep_k(key, 4, 12, "pow2")


def test_training_loss_reaches_encoder_and_repa_matches_cosine(converted, inputs):
  from flax import nnx
  model = converted[1].model
  images, _ = inputs
  projector = flextok.RepaProjector(D, 5, hidden=8, rngs=nnx.Rngs(0))
  targets = jnp.asarray(np.random.default_rng(6).normal(size=(2, GRID * GRID, 5)), jnp.float32)

  def loss_fn(model, projector):
    return flextok.training_loss(model, jax.random.PRNGKey(1), jnp.asarray(images),
                                 null_prob=0.5, projector=projector, repa_targets=targets)

  step = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, metrics), (grads, _) = step(model, projector)
  assert np.isfinite(float(loss)) and -1 <= float(metrics["repa_loss"]) <= 1
  np.testing.assert_allclose(float(loss), float(metrics["flow_loss"] + metrics["repa_loss"]),
                             rtol=1e-6)
  # the straight-through FSQ passes the decoder's gradient to the encoder
  assert float(jnp.abs(grads.encoder.blocks[0].attn.wq.kernel[...]).sum()) > 0
  a, b = np.random.default_rng(7).normal(size=(2, 3, 4, 6))
  want = -np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
  np.testing.assert_allclose(float(flextok.repa_loss(jnp.asarray(a), jnp.asarray(b))), want,
                             rtol=1e-5)
