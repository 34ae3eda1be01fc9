"""KL autoencoder (VA-VAE, SD-VAE) and its converters against an independent float64 NumPy
forward pass of the LDM Encoder/Decoder, written here from LDM
ldm/modules/diffusionmodules/model.py and LightningDiT tokenizer/autoencoder.py, operating
directly on the official (torch-layout, NCHW) state dict."""
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from tesserax.convert import torch_reader
from tesserax.convert import vae_checkpoints as vae
from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.tokenizers import kl_autoencoder, tokenizer

# The team's key/shape listing of the official VA-VAE AutoencoderKL, outside the repository:
# checked when present, skipped otherwise.
KEYS_FILE = "/work/shared/reference/keys/vavae_f16d32.txt"


# ------------------------------------------------------------------ NumPy float64 oracle (NCHW)


def conv(x, w, b, stride=1, pad=None):
  """torch Conv2d; pad = (top, bottom, left, right), default k // 2 on every side."""
  k = w.shape[-1]
  pad = (k // 2,) * 4 if pad is None else pad
  x = np.pad(x, ((0, 0), (0, 0), pad[:2], pad[2:]))
  ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out + b[None, :, None, None]


def group_norm(x, g, b):
  n, c, h, w = x.shape
  y = x.reshape(n, 32, -1)
  y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
  return y.reshape(n, c, h, w) * g[None, :, None, None] + b[None, :, None, None]


def swish(x):
  return x / (1 + np.exp(-x))


class Oracle:
  """The LDM AutoencoderKL over a state dict; the structure is read off the key names."""

  def __init__(self, sd):
    self.sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

  def has(self, prefix):
    return any(k.startswith(prefix) for k in self.sd)

  def conv(self, p, x, **kw):
    return conv(x, self.sd[p + ".weight"], self.sd[p + ".bias"], **kw)

  def norm(self, p, x):
    return group_norm(x, self.sd[p + ".weight"], self.sd[p + ".bias"])

  def resnet(self, p, x):
    h = self.conv(p + ".conv1", swish(self.norm(p + ".norm1", x)))
    h = self.conv(p + ".conv2", swish(self.norm(p + ".norm2", h)))
    if self.has(p + ".nin_shortcut."):
      x = self.conv(p + ".nin_shortcut", x)
    return x + h

  def attn(self, p, x):
    n, c, hh, ww = x.shape
    h = self.norm(p + ".norm", x)
    q = self.conv(p + ".q", h).reshape(n, c, -1).transpose(0, 2, 1)
    k = self.conv(p + ".k", h).reshape(n, c, -1)
    v = self.conv(p + ".v", h).reshape(n, c, -1)
    w = q @ k * c ** -0.5
    w = np.exp(w - w.max(2, keepdims=True))
    w /= w.sum(2, keepdims=True)
    return x + self.conv(p + ".proj_out", (v @ w.transpose(0, 2, 1)).reshape(n, c, hh, ww))

  def level(self, p, x):
    j = 0
    while self.has(f"{p}.block.{j}."):
      x = self.resnet(f"{p}.block.{j}", x)
      if self.has(f"{p}.attn.{j}."):
        x = self.attn(f"{p}.attn.{j}", x)
      j += 1
    if self.has(p + ".downsample."):
      x = self.conv(p + ".downsample.conv", x, stride=2, pad=(0, 1, 0, 1))
    if self.has(p + ".upsample."):
      x = self.conv(p + ".upsample.conv", x.repeat(2, axis=2).repeat(2, axis=3))
    return x

  def mid(self, p, x):
    x = self.resnet(p + ".block_1", x)
    return self.resnet(p + ".block_2", self.attn(p + ".attn_1", x))

  def levels(self, p):
    i = 0
    while self.has(f"{p}.{i}."):
      i += 1
    return i

  def encode(self, x):
    """Posterior (mean, logvar) of NCHW images."""
    h = self.conv("encoder.conv_in", x)
    for i in range(self.levels("encoder.down")):
      h = self.level(f"encoder.down.{i}", h)
    h = self.mid("encoder.mid", h)
    h = self.conv("encoder.conv_out", swish(self.norm("encoder.norm_out", h)))
    mean, logvar = np.split(self.conv("quant_conv", h), 2, axis=1)
    return mean, np.clip(logvar, -30, 20)

  def decode(self, z):
    h = self.mid("decoder.mid", self.conv("decoder.conv_in", self.conv("post_quant_conv", z)))
    for i in reversed(range(self.levels("decoder.up"))):
      h = self.level(f"decoder.up.{i}", h)
    return self.conv("decoder.conv_out", swish(self.norm("decoder.norm_out", h)))


# ------------------------------------------------------------------------- synthetic files


def tiny_vavae():
  """VA-VAE f16d32 at ch 32 and 32x32 inputs: the official key names, levels, attention at the
  last level (2x2 here) and latent width; only the channel widths are reduced."""
  c = kl_autoencoder.vavae_f16d32()
  c.ch, c.resolution, c.attn_resolutions, c.dtype = 32, 32, (2,), "float64"
  return c


def torch_shapes(config):
  """{LDM key: torch shape}, from the official naming scheme (nothing from
  convert/vae_checkpoints.py)."""
  c, shapes = config, {}
  widths = [c.ch * m for m in c.ch_mult]

  def conv(p, cin, cout, k):
    shapes[p + ".weight"], shapes[p + ".bias"] = (cout, cin, k, k), (cout,)

  def norm(p, ch):
    shapes[p + ".weight"] = shapes[p + ".bias"] = (ch,)

  def resnet(p, cin, cout):
    norm(p + ".norm1", cin), conv(p + ".conv1", cin, cout, 3)
    norm(p + ".norm2", cout), conv(p + ".conv2", cout, cout, 3)
    if cin != cout:
      conv(p + ".nin_shortcut", cin, cout, 1)

  def attn(p, ch):
    norm(p + ".norm", ch)
    for name in ("q", "k", "v", "proj_out"):
      conv(f"{p}.{name}", ch, ch, 1)

  def mid(p, ch):
    resnet(p + ".block_1", ch, ch), attn(p + ".attn_1", ch), resnet(p + ".block_2", ch, ch)

  last = len(widths) - 1
  conv("encoder.conv_in", 3, c.ch, 3)
  cin = c.ch
  for i, w in enumerate(widths):
    for j in range(c.num_res_blocks):
      resnet(f"encoder.down.{i}.block.{j}", cin, w)
      cin = w
      if c.resolution >> i in c.attn_resolutions:
        attn(f"encoder.down.{i}.attn.{j}", w)
    if i != last:
      conv(f"encoder.down.{i}.downsample.conv", w, w, 3)
  mid("encoder.mid", cin), norm("encoder.norm_out", cin)
  conv("encoder.conv_out", cin, 2 * c.z_channels, 3)
  conv("quant_conv", 2 * c.z_channels, 2 * c.embed_dim, 1)
  conv("post_quant_conv", c.embed_dim, c.z_channels, 1)
  conv("decoder.conv_in", c.z_channels, widths[-1], 3)
  mid("decoder.mid", widths[-1])
  cin = widths[-1]
  for i in reversed(range(len(widths))):
    for j in range(c.num_res_blocks + 1):
      resnet(f"decoder.up.{i}.block.{j}", cin, widths[i])
      cin = widths[i]
      if c.resolution >> i in c.attn_resolutions:
        attn(f"decoder.up.{i}.attn.{j}", widths[i])
    if i:
      conv(f"decoder.up.{i}.upsample.conv", widths[i], widths[i], 3)
  norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
  return shapes


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, s in shapes.items():
    if len(s) == 4:  # weights ~ 1 / sqrt(fan_in)
      sd[k] = rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))
    elif re.search(r"norm\w*\.weight$", k):
      sd[k] = 1 + 0.1 * rng.standard_normal(s)
    else:
      sd[k] = 0.1 * rng.standard_normal(s)
  return {k: v.astype(np.float32) for k, v in sd.items()}


def as_float64(model):
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: np.asarray(x, np.float64), state))


def images(n, size, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------- tests


def test_parameter_counts_equal_the_official_ones():
  def counts(config):
    model = nnx.eval_shape(lambda: kl_autoencoder.build(config))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return model, [sum(int(np.prod(x.shape)) for p, x in flat if part in (None, p[0]))
                   for part in (None, "encoder", "decoder")]

  va = kl_autoencoder.vavae_f16d32()
  model, va_counts = counts(va)
  # LightningDiT tokenizer/autoencoder.py AutoencoderKL(embed_dim=32, ch_mult=(1,1,2,2,4)):
  # total=69836067 enc=28413248 dec=41417603 (69.84M parameters).
  assert va_counts == [69836067, 28413248, 41417603]
  assert model.latent_shape == (16, 16, 32) and model.is_discrete is False
  assert (model.latent_dtype, model.codebook_size) == (np.float32, 0)
  # diffusers AutoencoderKL of stabilityai/sd-vae-ft-mse: 83,653,863 parameters.
  model, sd_counts = counts(kl_autoencoder.sd_vae_f8d4())
  assert sd_counts[0] == 83653863 and model.latent_shape == (32, 32, 4)
  # The model's official keys and shapes are those of the naming scheme above, which the
  # team's key listing (KEYS_FILE) confirms when present.
  rules = vae.ldm_rules(va)
  ours = {k: tuple(s if p is None else [s[p.index(i)] for i in range(len(p))])
          for k, (_, s, p) in rules.items()}
  assert ours == torch_shapes(va)
  if os.path.exists(KEYS_FILE):
    with open(KEYS_FILE) as f:
      listed = {k: tuple(json.loads(s.replace("(", "[").replace(",)", "]").replace(")", "]")))
                for k, s in (line.rstrip("\n").split("\t") for line in f
                             if line.strip() and not line.startswith("#"))}
    assert ours == listed


def test_registered_as_a_tokenizer_and_its_converters():
  assert registry.TOKENIZERS.get("kl_autoencoder") is kl_autoencoder.KLAutoencoder
  for kind in ("vavae-f16d32", "sd-vae-ft-ema", "sd-vae-ft-mse"):
    assert registry.CONVERTERS.get(kind).convert is vae.convert_vae


def test_converted_vavae_matches_numpy_float64(tmp_path):
  config = tiny_vavae()
  sd = random_state_dict(torch_shapes(config))
  training_only = {"loss.logvar": np.zeros((), np.float32),
                   "loss.discriminator.main.0.weight": np.zeros((64, 3, 4, 4), np.float32),
                   "linear_proj.weight": np.zeros((1024, 32, 1, 1), np.float32),
                   "foundation_model.model.cls_token": np.zeros((1, 1, 1024), np.float32)}
  torch_reader.write(str(tmp_path / "vavae.safetensors"), {**sd, **training_only})
  np.savez(tmp_path / "stats.npz", mean=np.arange(32, dtype=np.float32).reshape(1, 32, 1, 1),
           std=np.full((1, 32, 1, 1), 2.0, np.float32))
  out = vae.convert_vae("vavae-f16d32", tmp_path / "vavae.safetensors", tmp_path / "tok",
                        stats=tmp_path / "stats.npz", config=config)
  loaded = tokenizer.load(out)
  model, stats = loaded.model, loaded.stats
  assert (loaded.kind, loaded.family) == ("vavae-f16d32", "kl_autoencoder")
  np.testing.assert_array_equal(stats["mean"], np.arange(32))
  np.testing.assert_array_equal(stats["std"], np.full(32, 2.0))
  oracle = Oracle(sd)
  x = images(2, 32)
  mean, logvar = oracle.encode(nchw(x))
  z = np.random.default_rng(2).standard_normal((2, 2, 2, 32))
  recon = oracle.decode(nchw(z))
  with jax.enable_x64(True):
    model64 = as_float64(model)
    got_mean, got_logvar = model64.posterior(x)
    got_recon = model64.decode(z)
    assert got_mean.dtype == np.float64 and got_recon.dtype == np.float64
    np.testing.assert_allclose(nchw(got_mean), mean, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(nchw(got_logvar), logvar, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(nchw(got_recon), recon, rtol=1e-5, atol=1e-9)
    keys = jax.random.split(jax.random.key(3), 2)  # one key per example
    eps = np.stack([jax.random.normal(k, got_mean.shape[1:], got_mean.dtype) for k in keys])
    np.testing.assert_allclose(model64.encode(x, keys),
                               got_mean + np.exp(0.5 * got_logvar) * eps, rtol=1e-12)
    np.testing.assert_array_equal(model64.encode(x), got_mean)


def diffusers_state_dict(ldm, levels, legacy):
  """The diffusers AutoencoderKL file of an LDM state dict, by the renames of diffusers'
  convert_vae_pt_to_diffusers (written out here, independent of convert/vae_checkpoints.py)."""
  attn_names = ({"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"} if legacy
                else {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"})
  out = {}
  for key, value in ldm.items():
    parts = key.split(".")
    if parts[1] == "mid":
      inner = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[parts[2]]
      parts = [parts[0], "mid_block", *inner.split("."), *parts[3:]]
    elif parts[1] == "down":
      parts = [parts[0], "down_blocks", *parts[2:]]
    elif parts[1] == "up":
      parts = [parts[0], "up_blocks", str(levels - 1 - int(parts[2])), *parts[3:]]
    new = ".".join(parts)
    new = (new.replace(".block.", ".resnets.").replace(".nin_shortcut.", ".conv_shortcut.")
           .replace(".downsample.", ".downsamplers.0.").replace(".upsample.", ".upsamplers.0.")
           .replace("norm_out.", "conv_norm_out."))
    match = re.match(r"(.*attentions\.0)\.(norm|q|k|v|proj_out)\.(weight|bias)$", new)
    if match:
      name = "group_norm" if match[2] == "norm" else attn_names[match[2]]
      new = f"{match[1]}.{name}.{match[3]}"
      if value.ndim == 4:
        value = value[:, :, 0, 0]  # diffusers attention projections are Linear
    out[new] = value
  return out


@pytest.mark.parametrize("legacy", [False, True])
def test_sd_vae_diffusers_round_trip(tmp_path, legacy):
  config = kl_autoencoder.sd_vae_f8d4()
  config.ch, config.ch_mult, config.resolution, config.dtype = 32, (1, 2), 16, "float64"
  sd = random_state_dict(torch_shapes(config), seed=4)
  file = diffusers_state_dict(sd, 2, legacy)
  assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in file
  assert "encoder.down_blocks.1.resnets.0.conv_shortcut.weight" in file
  torch_reader.write(str(tmp_path / "diffusion_pytorch_model.safetensors"), file)
  out = vae.convert_vae("sd-vae-ft-mse", tmp_path / "diffusion_pytorch_model.safetensors",
                        tmp_path / "tok", config=config)
  loaded = tokenizer.load(out)
  model, stats = loaded.model, loaded.stats
  assert loaded.kind == "sd-vae-ft-mse"
  np.testing.assert_allclose(stats["std"], np.full(4, 1 / 0.18215), rtol=1e-6)
  np.testing.assert_array_equal(stats["mean"], np.zeros(4))
  # Round trip: every converted parameter is its source tensor in the flax layout.
  params = dict(np.load(os.path.join(out, "params.npz")))
  assert len(params) == len(sd)
  np.testing.assert_array_equal(params["decoder.up.1.upsample.conv.kernel"],
                                sd["decoder.up.1.upsample.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["encoder.mid.attn_1.q.kernel"][0, 0],
                                sd["encoder.mid.attn_1.q.weight"][:, :, 0, 0].T)
  x, z = images(1, 16, seed=5), np.random.default_rng(6).standard_normal((1, 8, 8, 4))
  oracle = Oracle(sd)
  with jax.enable_x64(True):
    model64 = as_float64(model)
    np.testing.assert_allclose(nchw(model64.encode(x)), oracle.encode(nchw(x))[0], rtol=1e-5,
                               atol=1e-9)
    np.testing.assert_allclose(nchw(model64.decode(z)), oracle.decode(nchw(z)), rtol=1e-5,
                               atol=1e-9)


def one_line_error(fn, *match):
  with pytest.raises(TesseraxError) as e:
    fn()
  message = str(e.value)
  assert "\n" not in message, message
  for m in match:
    assert m in message, message
  return message


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """The tiny VA-VAE in float32, from a converted random checkpoint (a random
  initialisation runs op by op and takes longer)."""
  config = tiny_vavae()
  config.dtype = "float32"
  tmp = tmp_path_factory.mktemp("tiny")
  torch_reader.write(str(tmp / "vavae.safetensors"), random_state_dict(torch_shapes(config)))
  np.savez(tmp / "stats.npz", mean=np.zeros(32), std=np.ones(32))
  out = vae.convert_vae("vavae-f16d32", tmp / "vavae.safetensors", tmp / "tok",
                        stats=tmp / "stats.npz", config=config)
  return tokenizer.load(out).model


def test_bad_input_is_refused_with_one_line(tmp_path, tiny_model):
  model = tiny_model
  one_line_error(lambda: model.encode(np.zeros((1, 64, 64, 3), np.float32)), "[N, 32, 32, 3]")
  one_line_error(lambda: model.encode(np.zeros((1, 32, 32, 1), np.float32)), "[N, 32, 32, 3]")
  one_line_error(lambda: model.encode(np.full((1, 32, 32, 3), 255.0, np.float32)), "[-1, 1]")
  one_line_error(lambda: model.decode(np.zeros((1, 4, 4, 32), np.float32)), "latent shape")
  # A checkpoint of another configuration: an SD-VAE file read as VA-VAE, a VA-VAE file at
  # other widths, a tokenizer directory whose params do not fit its config.
  config = tiny_vavae()
  sd_config = kl_autoencoder.sd_vae_f8d4()
  sd_config.ch, sd_config.ch_mult, sd_config.resolution = 32, (1, 2), 16
  diffusers = diffusers_state_dict(random_state_dict(torch_shapes(sd_config)), 2, False)
  torch_reader.write(str(tmp_path / "sd.safetensors"), diffusers)
  np.savez(tmp_path / "stats.npz", mean=np.zeros(32), std=np.ones(32))
  one_line_error(lambda: vae.convert_vae("vavae-f16d32", tmp_path / "sd.safetensors",
                                         tmp_path / "a", stats=tmp_path / "stats.npz",
                                         config=config), "missing", "unexpected")
  wide = tiny_vavae()
  wide.ch = 64
  torch_reader.write(str(tmp_path / "wide.safetensors"), random_state_dict(torch_shapes(wide)))
  one_line_error(lambda: vae.convert_vae("vavae-f16d32", tmp_path / "wide.safetensors",
                                         tmp_path / "b", stats=tmp_path / "stats.npz",
                                         config=config), "shape")
  one_line_error(lambda: vae.convert_vae("vavae-f16d32", tmp_path / "wide.safetensors",
                                         tmp_path / "c", config=config), "latents_stats.pt")
  np.savez(tmp_path / "stats16.npz", mean=np.zeros(16), std=np.ones(16))
  one_line_error(lambda: vae.convert_vae("vavae-f16d32", tmp_path / "wide.safetensors",
                                         tmp_path / "c", stats=tmp_path / "stats16.npz",
                                         config=config), "16 values")
  one_line_error(lambda: vae.convert_vae("sd-vae", tmp_path / "sd.safetensors", tmp_path / "d"),
                 "unknown --kind")
  out = vae.convert_vae("vavae-f16d32", tmp_path / "wide.safetensors", tmp_path / "e",
                        stats=tmp_path / "stats.npz", config=wide)
  meta = json.loads(open(os.path.join(out, "config.json")).read())
  meta["model"]["ch"] = 32
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(meta, f)
  one_line_error(lambda: tokenizer.load(out), "params.npz")
  one_line_error(lambda: tokenizer.load(tmp_path), "not a tokenizer directory")
  one_line_error(lambda: tokenizer.load(tmp_path / "none"), "tokenizer directory not found")
  meta["model"]["ch"] = 64
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(meta, f)
  os.remove(os.path.join(out, tokenizer.STATS_FILE))
  one_line_error(lambda: tokenizer.load(out), "without latent_stats.npz")


def test_logvar_is_clamped(tiny_model):
  model = tiny_model
  bias = model.quant_conv.bias[...]
  x = images(1, 32).astype(np.float32)
  model.quant_conv.bias[...] = bias.at[32:].set(1e3)
  np.testing.assert_array_equal(model.posterior(x)[1], 20.0)
  model.quant_conv.bias[...] = bias.at[32:].set(-1e3)
  np.testing.assert_array_equal(model.posterior(x)[1], -30.0)
  model.quant_conv.bias[...] = bias
