"""Official KL-autoencoder checkpoints -> tesserax tokenizer directories
(tokenizers/tokenizer.py writes and reads them).

  convert_vae(kind, src, out_dir, stats=None, config=None)   an official file -> out_dir

Kinds, each registered in core/registry.py CONVERTERS (`tesserax convert --kind`):
  vavae-f16d32    hustvl vavae-imagenet256-f16d32-dinov2.pt, the LDM state dict (under
                  "state_dict" where the file has one) with training-time entries; the loader
                  of LightningDiT tokenizer/vavae.py drops every key containing "loss" and
                  loads with strict=False, which ignores `foundation_model.*` (the frozen
                  DINOv2) and `linear_proj.weight` (the VF projection). Those three groups are
                  dropped here, everything else must be the autoencoder. Latent statistics:
                  `latents_stats.pt` ({"mean", "std"}, one value per channel), by default
                  next to `src`.
  sd-vae-ft-ema, sd-vae-ft-mse
                  stabilityai/sd-vae-ft-{ema,mse} diffusion_pytorch_model.{safetensors,bin}, the
                  diffusers AutoencoderKL layout: down_blocks.N.resnets.M (nin_shortcut named
                  conv_shortcut), downsamplers.0 / upsamplers.0, mid_block.resnets.{0,1} and
                  attentions.0 with Linear to_q/to_k/to_v/to_out.0 (query/key/value/proj_attn
                  in older files), group_norm, conv_norm_out, and `decoder.up_blocks` in
                  processing order (up_blocks.0 = the LDM `up[-1]`). Latent statistics: the
                  scaling factor 0.18215 of the LDM kl-f8 recipe, as mean 0 and std 1/0.18215
                  per channel, unless `stats` gives a file.

Every key of the source is consumed exactly once; missing or unexpected keys are one error
listing them, a misshapen key an error naming it (backbones/weights.convert). The directory
holds the kl_autoencoder family, the latent statistics (mean, std of shape [embed_dim]) and the
flat "encoder.down.0.block.0.conv1.kernel" parameters.
"""
import os
import pathlib
import re

import numpy as np
from flax import nnx

from tesserax.backbones import weights
from tesserax.convert import torch_reader
from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.tokenizers import kl_autoencoder
from tesserax.tokenizers import tokenizer

KINDS = {"vavae-f16d32": "vavae_f16d32", "sd-vae-ft-ema": "sd_vae_f8d4",
         "sd-vae-ft-mse": "sd_vae_f8d4"}
SD_SCALING_FACTOR = 0.18215
_VAVAE_TRAINING_ONLY = re.compile(r"loss|^foundation_model\.|^linear_proj\.")


def ldm_rules(config) -> dict:
  """{LDM state-dict key: (flax key, flax shape, perm)} for the model `config` builds."""
  model = nnx.eval_shape(lambda: kl_autoencoder.build(config))
  return dict(weights._torch_rule(".".join(map(str, path)), tuple(x.shape))  # pylint: disable=protected-access
              for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def diffusers_key(ldm_key: str, num_levels: int, legacy_attention: bool = False) -> str:
  """The diffusers AutoencoderKL name of an LDM state-dict key."""
  attn = ({"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"} if legacy_attention
          else {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"})
  attn["norm"] = "group_norm"
  key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)",
               lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", ldm_key)
  key = re.sub(r"\.mid\.attn_1\.", ".mid_block.attentions.0.", key)
  key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
  key = re.sub(r"^decoder\.up\.(\d+)\.",
               lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.", key)
  key = re.sub(r"\.block\.(\d+)\.", r".resnets.\1.", key)
  key = re.sub(r"\.attn\.(\d+)\.", r".attentions.\1.", key)
  key = key.replace(".downsample.", ".downsamplers.0.").replace(".upsample.", ".upsamplers.0.")
  key = key.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
  return re.sub(r"(attentions\.\d+)\.(norm|q|k|v|proj_out)\.",
                lambda m: f"{m[1]}.{attn[m[2]]}.", key)




def _check_keys(tensors, expected, what):
  """One error listing every missing and unexpected key."""
  missing = [k for k in expected if k not in tensors.shapes]
  unexpected = [k for k in tensors.shapes if k not in expected]
  problems = [f"{label} {len(keys)}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
              for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
  if problems:
    raise TesseraxError(f"{tensors.path.name} is not a {what} checkpoint: " + "; ".join(problems))


def vavae_params(src, config) -> dict:
  """Flat flax params of an official VA-VAE file, its training-only keys dropped."""
  tensors = torch_reader.read_state_dict(src)
  dropped = {k: s for k, s in tensors.shapes.items() if _VAVAE_TRAINING_ONLY.search(k)}
  rules = ldm_rules(config)
  _check_keys(tensors, set(rules) | set(dropped), "VA-VAE (LDM AutoencoderKL)")
  return weights.convert(tensors, rules, dropped=dropped)


def diffusers_params(src, config) -> dict:
  """Flat flax params of a diffusers AutoencoderKL file. Attention projections are Linear
  [out, in] there (1x1 convs [out, in, 1, 1] in the LDM layout)."""
  tensors = torch_reader.read_state_dict(src)
  legacy = any(".attentions.0.query." in k for k in tensors.shapes)
  rules, shapes = {}, {}
  for ldm_key, (flax_key, shape, perm) in ldm_rules(config).items():
    key = diffusers_key(ldm_key, len(config.ch_mult), legacy)
    shapes[flax_key] = shape
    if len(shape) == 4 and len(tensors.shapes.get(key, ())) == 2:  # Linear [out, in]
      rules[key] = (flax_key, shape[2:], (1, 0))
    else:
      rules[key] = (flax_key, shape, perm)
  _check_keys(tensors, rules, "diffusers AutoencoderKL")
  return {k: v.reshape(shapes[k]) for k, v in weights.convert(tensors, rules).items()}


def read_stats(path, embed_dim) -> dict:
  """{"mean", "std"} float32 [embed_dim] from a latents_stats file (any shape holding one value
  per channel, e.g. [1, C, 1, 1])."""
  tensors = torch_reader.read_state_dict(path)
  _check_keys(tensors, {"mean", "std"}, "latent statistics")
  stats = {k: tensors.read(k).reshape(-1) for k in ("mean", "std")}
  for k, v in stats.items():
    if v.shape != (embed_dim,):
      raise TesseraxError(f"{path}: {k} has {v.size} values; the tokenizer has {embed_dim} "
                          "latent channels")
  if not np.all(stats["std"] > 0):
    raise TesseraxError(f"{path}: std must be positive")
  return stats


def convert_vae(kind: str, src, out_dir, stats=None, config=None) -> str:
  """Convert the official file `src` of `kind` into a new tokenizer directory `out_dir`.
  `config` (default: the kind's) serves files of the same family at other sizes, e.g. the
  f16d16 / f16d64 VA-VAE variants. Returns the absolute out_dir."""
  if kind not in KINDS:
    raise TesseraxError(f"unknown --kind {kind!r}; choose from {', '.join(KINDS)}")
  if not os.path.isfile(src):
    raise TesseraxError(f"checkpoint file not found: {src}")
  config = config or kl_autoencoder.CONFIGS[KINDS[kind]]()
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, tokenizer.PARAMS_FILE)):
    raise TesseraxError(f"{out_dir} already holds a tokenizer; convert into a new directory")
  if kind == "vavae-f16d32":
    stats = stats or pathlib.Path(src).with_name("latents_stats.pt")
    if not os.path.exists(stats):
      raise TesseraxError(f"latent statistics {stats} not found: download latents_stats.pt "
                          "from hustvl/vavae-imagenet256-f16d32-dinov2 and pass it with --stats")
    latent_stats = read_stats(stats, config.embed_dim)
    params = vavae_params(src, config)
  else:
    params = diffusers_params(src, config)
    latent_stats = (read_stats(stats, config.embed_dim) if stats else
                    {"mean": np.zeros(config.embed_dim, np.float32),
                     "std": np.full(config.embed_dim, 1 / SD_SCALING_FACTOR, np.float32)})
  return tokenizer.save(out_dir, kind, "kl_autoencoder", config, params, latent_stats)


for _kind in KINDS:
  registry.CONVERTERS.register(_kind, registry.Converter(convert_vae))
