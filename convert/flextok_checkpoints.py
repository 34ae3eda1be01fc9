"""Official FlexTok checkpoints -> tesserax tokenizer directories (tokenizers/tokenizer.py).

  convert_flextok(kind, src, out_dir, config=None, scaling_factor=None)
      EPFL-VILAB/flextok_{d12_d12,d18_d18,d18_d28}_{in1k,dfn} model.safetensors -> a "flextok"
      tokenizer directory (VAE + encoder + FSQ + decoder).
  convert_vae(kind, src, out_dir, config=None, scaling_factor=None)
      EPFL-VILAB/flextok_vae_c{4,8,16} diffusion_pytorch_model.safetensors -> a
      "kl_autoencoder" tokenizer directory, latent statistics mean 0 (or the diffusers
      shift_factor) and std 1 / scaling_factor.

The model config is the checkpoint's own: the hydra dict that apple/ml-flextok stores in the
safetensors `__metadata__` (flextok/utils/checkpoint.py save_safetensors: one str(value) per
top-level key, read back with ast.literal_eval), else the `config.json` next to the file
(FlexTokFromHub: keys vae, encoder, decoder, regularizer, flow_matching_noise_module,
pipeline; the diffusers config for a standalone VAE), or the one given. The config is read as
data only: every `_target_` it names must be one of the FlexTok classes below (a config naming
any other module is refused in one line), nothing is imported or instantiated, and settings
that tesserax's FlexTok does not implement (biases, GELU, other masks) are refused by name.
A config whose `vae` is None describes a pixel FlexTok (the encoder patches the images).

The keys are the file header's: the expected state-dict names and shapes are derived from the
model that config builds (the `module_dict` names taken from the config where it gives them)
and compared with the header; any difference is one error listing the missing, unexpected and
misshapen keys. The fixed sin-cos position embeddings stored in the file are checked against
their recomputation. Linear weights [out, in] become kernels [in, out]; the 1-D register
position embedding (1, 1, d, 256) becomes [256, d]; the VAE is read by the diffusers key map of
convert/vae_checkpoints.py under `vae.vae.`.
"""
import ast
import json
import os
import pathlib
import re
import struct

import ml_collections
import numpy as np
from flax import nnx

from tesserax.backbones import weights
from tesserax.convert import vae_checkpoints
from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.core.files import one_line
from tesserax.tokenizers import flextok, fsq, tokenizer

# Every class or function a released FlexTok config may name (flextok/**, torch.nn's SiLU).
KNOWN_TARGETS = frozenset((
    "FlexTok", "FlexTokFromHub", "StableDiffusionVAE", "SequentialModuleDictWrapper",
    "PerSampleOp", "PerSampleReducer", "DictKeyFilter", "channels_first_to_last",
    "channels_last_to_first", "PatchEmbedder", "PositionalEmbeddingAdder", "Registers1D",
    "BlockWiseSequencePacker", "FlexTransformer", "SequenceUnpacker", "LinearHead",
    "ToPatchesLinearHead", "LinearLayer", "MaskedNestedDropout", "LearnedNullCond",
    "ZeroNullCond", "TimestepEmbedder", "FSQ", "MinRFNoiseModule", "MinRFPipeline",
    "Fp32LayerNorm", "SiLU"))
# The module_dict names of the released configs, where a config does not give its own.
DEFAULT_NAMES = {
    "enc_patch": "enc_patch_emb", "enc_posemb": "enc_posemb_module",
    "enc_registers": "enc_register_module", "enc_transformer": "enc_transformer",
    "enc_head": "enc_to_latents", "dec_from_latents": "dec_from_latents",
    "dec_reg_posemb": "dec_registers_posemb_module", "dec_dropout": "dec_nested_dropout",
    "dec_nullcond": "dec_latent_dropout", "dec_patch": "dec_noise_patch_emb",
    "dec_posemb": "dec_patches_posemb_module", "dec_time": "dec_time_embedder",
    "dec_transformer": "dec_transformer", "dec_head": "dec_to_patches"}
_WRAPPED = re.compile(r"(_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
_POSEMB_ATOL = 1e-3  # stored in the checkpoint's dtype; a wrong layout differs by O(1)


# ---------------------------------------------------------------------------- the config


def read_metadata(path) -> dict:
  """The safetensors `__metadata__` {str: str} of `path` ({} when absent)."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise TesseraxError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > path.stat().st_size - 8:
      raise TesseraxError(f"{path}: not a safetensors file (header length past the end)")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise TesseraxError(f"{path}: not a safetensors file ({one_line(e)})") from None
  meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
  return meta if isinstance(meta, dict) else {}


def _literal(value):
  """A metadata string as the data it spells (ast.literal_eval: literals only, nothing runs),
  else the string itself."""
  if not isinstance(value, str):
    return value
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return value


def _read_json(path, what):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise TesseraxError(f"{path}: cannot read the {what} ({one_line(e)})") from None


def hydra_config(src, config=None) -> dict:
  """The FlexTok hydra dict of `src`: from `config` (a dict or a JSON path), the file's
  metadata, or config.json next to it."""
  if isinstance(config, (str, os.PathLike)):
    config = _read_json(config, "FlexTok config")
  if config is None:
    config = {k: _literal(v) for k, v in read_metadata(src).items()}
    if "encoder" not in config:
      path = pathlib.Path(src).with_name("config.json")
      if not path.exists():
        raise TesseraxError(f"{src} holds no FlexTok config in its metadata and there is no "
                            f"config.json next to it (FlexTokFromHub's); pass config=")
      config = _read_json(path, "FlexTok config")
  if isinstance(config.get("config"), dict):  # PyTorchModelHubMixin's {"config": {...}}
    config = config["config"]
  missing = [k for k in ("vae", "encoder", "decoder", "regularizer") if k not in config]
  if missing:
    raise TesseraxError(f"the FlexTok config of {src} lacks {', '.join(missing)} (it has "
                        f"{', '.join(map(str, config)) or 'nothing'})")
  malformed = [k for k in ("vae", "encoder", "decoder", "regularizer")
               if not isinstance(config[k], dict) and not (k == "vae" and config[k] is None)]
  if malformed:
    raise TesseraxError(f"the FlexTok config of {src}: {', '.join(malformed)} is not a config "
                        "dict (a Python or JSON literal)")
  check_targets(config)
  return config


def check_targets(tree, where="config"):
  """Refuses in one line any `_target_` that is not a known FlexTok module."""
  if isinstance(tree, dict):
    target = tree.get("_target_")
    if target is not None and str(target).rsplit(".", 1)[-1] not in KNOWN_TARGETS:
      raise TesseraxError(f"the checkpoint's {where} names an unknown module {target!r}; "
                          "only FlexTok's own modules are accepted, nothing is imported")
    for key, value in tree.items():
      check_targets(value, f"{where}.{key}")
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      check_targets(value, f"{where}[{i}]")


def _target(node):
  return str(node.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(node, dict) else ""


def _modules(part) -> dict:
  """{name: node} of a SequentialModuleDictWrapper config (empty if it gives no names)."""
  modules = part.get("module_dict", {}) if isinstance(part, dict) else {}
  return modules if isinstance(modules, dict) else {}


def _find(modules, target, pick=None):
  """(name, node) of the module of class `target` (and `pick(node)`), or None."""
  for name, node in modules.items():
    if _target(node) == target and (pick is None or pick(node)):
      return name, node
  return None


def _setting(node, key, default, where, allowed=None):
  value = node.get(key, default) if isinstance(node, dict) else default
  if allowed is not None and value not in allowed:
    raise TesseraxError(f"the checkpoint's {where} sets {key}={value!r}; tesserax's FlexTok "
                        f"implements {' or '.join(map(repr, allowed))}")
  return value


def _check_transformer(node, where):
  for key, default, allowed in (("qkv_bias", False, (False,)), ("proj_bias", False, (False,)),
                                ("mlp_bias", False, (False,)), ("gated_mlp", True, (True,)),
                                ("qk_norm", True, (True,))):
    _setting(node, key, default, where, allowed)
  act = node.get("act_layer")
  if act is not None and _target(act) != "SiLU":
    raise TesseraxError(f"the checkpoint's {where} uses act_layer {act!r}; tesserax's FlexTok "
                        "implements SiLU")


def config_grid(posemb) -> int:
  """The side of the patch grid of a sin-cos PositionalEmbeddingAdder (max_sizes [h, w])."""
  sizes = _setting(posemb, "max_sizes", [16, 16], "encoder position embedding")
  if len(sizes) != 2 or sizes[0] != sizes[1]:
    raise TesseraxError(f"position embedding max_sizes {sizes}: tesserax's FlexTok takes a "
                        "square grid")
  return int(sizes[0])


def model_config(hydra: dict, scaling_factor=None):
  """(tesserax FlexTok config, {role: module_dict name}) of a FlexTok hydra dict."""
  enc, dec = _modules(hydra["encoder"]), _modules(hydra["decoder"])
  names = dict(DEFAULT_NAMES)
  roles = {  # role: (modules, class, pick)
      "enc_patch": (enc, "PatchEmbedder", None),
      "enc_posemb": (enc, "PositionalEmbeddingAdder", None),
      "enc_registers": (enc, "Registers1D", None),
      "enc_transformer": (enc, "FlexTransformer", None),
      "enc_head": (enc, "LinearHead", None),
      "dec_from_latents": (dec, "LinearLayer", None),
      "dec_reg_posemb": (dec, "PositionalEmbeddingAdder",
                         lambda n: n.get("posemb_type", "sincos") != "sincos"),
      "dec_dropout": (dec, "MaskedNestedDropout", None),
      "dec_nullcond": (dec, "LearnedNullCond", None),
      "dec_patch": (dec, "PatchEmbedder", None),
      "dec_posemb": (dec, "PositionalEmbeddingAdder",
                     lambda n: n.get("posemb_type", "sincos") == "sincos"),
      "dec_time": (dec, "TimestepEmbedder", None),
      "dec_transformer": (dec, "FlexTransformer", None),
      "dec_head": (dec, "ToPatchesLinearHead", None)}
  nodes = {}
  for role, (modules, target, pick) in roles.items():
    found = _find(modules, target, pick)
    if found:
      names[role], nodes[role] = found
  zero_null = _find(dec, "ZeroNullCond")
  if zero_null:
    names["dec_nullcond"] = zero_null[0]
  get = lambda role: nodes.get(role, {})
  packer = _find(enc, "BlockWiseSequencePacker")
  if packer:
    _setting(packer[1], "mask_mode", "full", "encoder sequence packer", ("causal_last",))
  for role in ("enc_transformer", "dec_transformer"):
    _check_transformer(get(role), role)
  enc_t, dec_t = get("enc_transformer"), get("dec_transformer")
  vae = hydra["vae"]
  if vae is not None:
    scaling_factor = scaling_factor or vae.get("scaling_factor")
    if scaling_factor is None:
      raise TesseraxError("the checkpoint's VAE config gives no scaling_factor; pass "
                          "scaling_factor= (the flextok_vae_c16 config.json's value)")
  levels = tuple(int(l) for l in _setting(hydra["regularizer"], "levels",
                                          fsq.FLEXTOK_LEVELS, "regularizer"))
  patch = _setting(get("enc_patch"), "patch_sizes", [2, 2], "encoder patch embedding")
  if len(set(patch)) != 1 or list(patch) != list(_setting(get("dec_patch"), "patch_sizes",
                                                          patch, "decoder patch embedding")):
    raise TesseraxError(f"patch_sizes {patch}: tesserax's FlexTok takes one square patch size "
                        "for encoder and decoder")
  c = flextok.flextok_config(
      "d12-d12", patch_size=int(patch[0]), levels=levels,
      num_registers=int(_setting(get("enc_registers"), "n_max", 256, "registers")),
      encoder_dim=int(_setting(enc_t, "dim", 768, "encoder")),
      encoder_depth=int(_setting(enc_t, "depth", 12, "encoder")),
      decoder_dim=int(_setting(dec_t, "dim", 768, "decoder")),
      decoder_depth=int(_setting(dec_t, "depth", 12, "decoder")),
      head_dim=int(_setting(enc_t, "head_dim", 64, "encoder")),
      mlp_ratio=float(_setting(enc_t, "mlp_ratio", 4.0, "encoder")),
      adaln_expansion=int(_setting(dec_t, "adaLN_expansion", 1, "decoder")),
      null_cond="zero" if zero_null else "learned",
      max_timestep=float(_setting(get("dec_time"), "max_timestep", 1000.0, "time embedder")))
  if vae is None:  # a pixel FlexTok: the encoder patches the images themselves
    del c.vae, c.vae_scaling_factor
    c.channels = int(_setting(get("enc_patch"), "channels_in", 3, "encoder patch embedding"))
    c.resolution = int(round(config_grid(get("enc_posemb")) * c.patch_size))
  else:
    c.vae = flextok.vae_config(int(vae.get("latent_channels", 16)))
    c.vae_scaling_factor = float(scaling_factor)
  for key, node in (("head_dim", dec_t), ("mlp_ratio", dec_t)):
    if _setting(node, key, c[key], "decoder") != c[key]:
      raise TesseraxError(f"the checkpoint's decoder {key} differs from the encoder's; "
                          "tesserax's FlexTok shares it")
  _setting(get("dec_time"), "frequency_embedding_size", flextok.TIME_FREQUENCY_DIM,
           "time embedder", (flextok.TIME_FREQUENCY_DIM,))
  return c, names


# ------------------------------------------------------------------------------ the keys


def _linear(flax_prefix, official_prefix, shape, bias=True):
  """{official key: (flax key, flax shape, perm)} of one Linear."""
  rules = {f"{official_prefix}.weight": (f"{flax_prefix}.kernel", shape, (1, 0))}
  if bias:
    rules[f"{official_prefix}.bias"] = (f"{flax_prefix}.bias", shape[1:], None)
  return rules


def key_rules(config, names=None, legacy_attention=False):
  """({official key: (flax key, flax shape, perm)}, {official key: (dim, side)}) of the model
  `config` builds: its parameters, and the sin-cos position embeddings (1, dim, side, side).
  The register position embedding's perm is "register_posemb"."""
  names = names or DEFAULT_NAMES
  model = nnx.eval_shape(lambda: flextok.build(config))
  shapes = {".".join(map(str, p)): tuple(x.shape)
            for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  e, d = "encoder.module_dict.", "decoder.module_dict."
  rules = {}
  if config.get("vae") is not None:
    for ldm_key, (flax_key, shape, perm) in vae_checkpoints.ldm_rules(config.vae).items():
      key = "vae.vae." + vae_checkpoints.diffusers_key(ldm_key, len(config.vae.ch_mult),
                                                       legacy_attention)
      rules[key] = ("vae." + flax_key, shape, perm)
  simple = {  # flax module -> official module (Linears)
      "encoder.patch_proj": f"{e}{names['enc_patch']}.patch_proj",
      "encoder.to_latents": f"{e}{names['enc_head']}.proj",
      "decoder.from_latents": f"{d}{names['dec_from_latents']}.proj",
      "decoder.patch_proj": f"{d}{names['dec_patch']}.patch_proj",
      "decoder.time_mlp_0": f"{d}{names['dec_time']}.mlp.0",
      "decoder.time_mlp_2": f"{d}{names['dec_time']}.mlp.2",
      "decoder.to_patches_adaLN_modulation": f"{d}{names['dec_head']}.adaLN_modulation.1",
      "decoder.to_patches_proj": f"{d}{names['dec_head']}.proj"}
  for flax_key, shape in shapes.items():
    if flax_key.startswith("vae."):
      continue
    module, leaf = flax_key.rsplit(".", 1)
    perm = (1, 0) if leaf == "kernel" else None
    official_leaf = "weight" if leaf == "kernel" else leaf
    block = re.match(r"(encoder|decoder)\.blocks\.(\d+)\.(.*)$", module)
    if module in simple:
      official = f"{simple[module]}.{official_leaf}"
    elif block:
      part, i, rest = block.groups()
      trunk = f"{e}{names['enc_transformer']}" if part == "encoder" else \
          f"{d}{names['dec_transformer']}"
      rest = "adaLN_modulation.1" if rest == "adaLN_modulation" else rest
      official = f"{trunk}.blocks.{i}.{rest}.{official_leaf}"
    else:
      official, perm = {
          "encoder.registers": (f"{e}{names['enc_registers']}.registers", None),
          "decoder.registers_posemb": (f"{d}{names['dec_reg_posemb']}.posembs",
                                       "register_posemb"),
          "decoder.mask_token": (f"{d}{names['dec_dropout']}.dropout_mask_token", None),
          "decoder.nullcond": (f"{d}{names['dec_nullcond']}.nullcond", None)}[flax_key]
    rules[official] = (flax_key, shape, perm)
  side = model.encoder.posemb_shape[1]
  buffers = {f"{e}{names['enc_posemb']}.posembs": (config.encoder_dim, side),
             f"{d}{names['dec_posemb']}.posembs": (config.decoder_dim, side)}
  return rules, buffers


def official_shape(shape, perm):
  """The state-dict shape of a parameter of flax `shape` under a `key_rules` perm."""
  if perm == "register_posemb":
    return (1, 1, shape[1], shape[0])
  return shape if perm is None else tuple(shape[perm.index(i)] for i in range(len(perm)))


def _differences(header: dict, expected: dict) -> list:
  missing = sorted(k for k in expected if k not in header)
  unexpected = sorted(k for k in header if k not in expected)
  misshapen = sorted(f"{k} {header[k]} (expected {expected[k]})" for k in expected
                     if k in header and tuple(header[k]) != tuple(expected[k]))
  return [f"{label} {len(keys)}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
          for label, keys in (("missing", missing), ("unexpected", unexpected),
                              ("misshapen", misshapen)) if keys]


def convert_params(tensors: weights.Tensors, config, names=None) -> dict:
  """Flat flax params of a FlexTok state dict (header keys checked first, all at once)."""
  header = {_WRAPPED.sub("", k): k for k in tensors.shapes}
  shapes = {k: tuple(tensors.shapes[v]) for k, v in header.items()}
  legacy = any(".attentions.0.query." in k for k in shapes)
  rules, buffers = key_rules(config, names, legacy)
  expected = {k: official_shape(shape, perm) for k, (_, shape, perm) in rules.items()}
  for key, (dim, side) in buffers.items():
    expected[key] = (1, dim, side, side)
  for key, (flax_key, shape, perm) in rules.items():  # diffusers Linear attention projections
    if len(shape) == 4 and len(shapes.get(key, ())) == 2:
      expected[key] = (shape[3], shape[2])
      rules[key] = (flax_key, shape, "linear_as_conv")
  problems = _differences(shapes, expected)
  if problems:
    raise TesseraxError(f"{tensors.path.name} does not match the FlexTok its config describes: "
                        + "; ".join(problems))
  for key, (dim, side) in buffers.items():
    stored = tensors.read(header[key])[0].reshape(dim, -1).T
    want = flextok.sincos_posemb_2d(dim, side, side)
    if np.max(np.abs(stored - want)) > _POSEMB_ATOL:
      raise TesseraxError(f"{tensors.path.name}: {key} is not the 2-D sin-cos embedding "
                          "FlexTok builds (layout or temperature differs)")
  params = {}
  for key, (flax_key, shape, perm) in rules.items():
    x = tensors.read(header[key])
    if perm == "register_posemb":
      x = x[0, 0].T
    elif perm == "linear_as_conv":
      x = x.T.reshape(shape)
    elif perm is not None:
      x = x.transpose(perm)
    params[flax_key] = np.ascontiguousarray(x, np.float32)
  return params


def _new_directory(src, out_dir):
  if not os.path.isfile(src):
    raise TesseraxError(f"checkpoint file not found: {src}")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, tokenizer.PARAMS_FILE)):
    raise TesseraxError(f"{out_dir} already holds a tokenizer; convert into a new directory")
  return out_dir


def convert_flextok(kind, src, out_dir, stats=None, config=None, scaling_factor=None) -> str:
  """An official FlexTok model.safetensors -> a new "flextok" tokenizer directory."""
  if stats is not None:
    raise TesseraxError("--stats does not apply to FlexTok (a discrete tokenizer)")
  out_dir = _new_directory(src, out_dir)
  model_cfg, names = model_config(hydra_config(src, config), scaling_factor)
  params = convert_params(weights.read_tensors(src), model_cfg, names)
  return tokenizer.save(out_dir, kind, "flextok", model_cfg, params)


def vae_model_config(diffusers: dict) -> ml_collections.ConfigDict:
  """The kl_autoencoder config of a diffusers AutoencoderKL config.json (FlexTok's VAEs)."""
  for key, want in (("act_fn", "silu"), ("norm_num_groups", 32)):
    if diffusers.get(key, want) != want:
      raise TesseraxError(f"the VAE config sets {key}={diffusers[key]!r}; the KL autoencoder "
                          f"implements {want!r}")
  widths = list(diffusers.get("block_out_channels", (128, 256, 512, 512)))
  c = flextok.vae_config(int(diffusers.get("latent_channels", 16)))
  c.ch, c.ch_mult = widths[0], tuple(w // widths[0] for w in widths)
  c.num_res_blocks = int(diffusers.get("layers_per_block", 2))
  return c


def convert_vae(kind, src, out_dir, stats=None, config=None, scaling_factor=None) -> str:
  """A FlexTok VAE (diffusers AutoencoderKL safetensors, config.json next to it or given) ->
  a new kl_autoencoder tokenizer directory."""
  if stats is not None:
    raise TesseraxError("--stats does not apply: the statistics come from the VAE config's "
                        "scaling_factor (and shift_factor)")
  out_dir = _new_directory(src, out_dir)
  if not isinstance(config, dict):
    path = config or pathlib.Path(src).with_name("config.json")
    if not os.path.exists(path):
      raise TesseraxError(f"no config.json next to {src}: download it with the VAE (its "
                          "scaling_factor is the latent scale), or pass config=")
    config = _read_json(path, "diffusers VAE config")
  check_targets(config)
  model_cfg = vae_model_config(config)
  scale = scaling_factor or config.get("scaling_factor")
  if scale is None:
    raise TesseraxError(f"the VAE config of {src} gives no scaling_factor; pass "
                        "scaling_factor=")
  shift = config.get("shift_factor") or 0.0
  params = vae_checkpoints.diffusers_params(src, model_cfg)
  stats = {"mean": np.full(model_cfg.embed_dim, shift, np.float32),
           "std": np.full(model_cfg.embed_dim, 1.0 / float(scale), np.float32)}
  return tokenizer.save(out_dir, kind, "kl_autoencoder", model_cfg, params, stats)


registry.CONVERTERS.register("flextok", registry.Converter(convert_flextok))
registry.CONVERTERS.register("flextok-vae", registry.Converter(convert_vae))
