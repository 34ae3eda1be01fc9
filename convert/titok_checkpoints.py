"""Official TiTok, TA-TiTok and MaskGIT-VQGAN checkpoints -> tesserax tokenizer directories
(tokenizers/tokenizer.py writes and reads them).

  convert_titok(kind, src, out_dir, stats=None, config=None)   an official file -> out_dir

Kinds, each registered in core/registry.py CONVERTERS (`tesserax convert --kind`), with the file
they read (a flat state dict: the HF `model.safetensors` of PyTorchModelHubMixin, or the raw
torch.save `.bin` of fun-research/TiTok and fun-research/TA-TiTok):
  titok-l32, titok-b64, titok-s128        yucornetto/tokenizer_titok_{l32,b64,s128}_imagenet
                                          (legacy: MaskGIT-VQGAN pixel decoder, `pixel_*` keys)
  titok-{bl64,bl128,sl256}-vq8k           yucornetto/tokenizer_titok_*_vq8k_imagenet
  titok-{ll32,bl64,bl128}-vae-c16         yucornetto/tokenizer_titok_*_vae_c16_imagenet
  tatitok-{bl32,bl64,bl128}-vq            turkeyju/tokenizer_tatitok_*_vq
  tatitok-{bl32,bl64}-vae, tatitok-sl128-vae   turkeyju/tokenizer_tatitok_*_vae
  maskgit-vqgan-f16-256                   fun-research/TiTok maskgit-vqgan-imagenet-f16-256.bin
                                          (the proxy-code tokenizer: encoder, decoder, quantize)

Key map (official name <- tesserax name): Linear weight = kernel.T, Conv OIHW = HWIO
transposed, norm weight = scale; `attn.in_proj_{weight,bias}` <- `attn.qkv` (rows [q; k; v],
kept packed), `attn.out_proj` <- `attn.proj`, `mlp.c_fc` / `mlp.c_proj` <- `mlp.fc1` / `mlp.fc2`,
`decoder.ffn.0` / `decoder.ffn.2` <- `decoder.ffn_in` / `decoder.ffn_out`,
`quantize.embedding.weight` <- `codebook`, `pixel_quantize.embedding.weight` <- `pixel_codebook`.
Every key of the source is consumed exactly once: TA-TiTok VQ files may hold the
`quantize.embed_prob` buffer of `clustering_vq` (code-usage statistics for training), which is
checked and not kept. A file of another model (another TiTok size, a VQ file for a VAE kind) is
refused in one line listing the missing, unexpected and misshapen keys.

VAE kinds get latent statistics mean 0, std 1 per channel (the official models use the latents
as they are) unless `stats` names a file holding {"mean", "std"}.

  convert_generator(kind, src, out_dir, overrides=None)   an official generator -> a workdir

Generator kinds: titok-generator-l32, -b64 (ImageBert, the HF BertModel under `model.`) and
titok-generator-s128 (UViTBert), yucornetto/generator_titok_{l32,b64,s128}_imagenet or
fun-research/TiTok generator_titok_*.bin, into a token_generator workdir (config.json and
checkpoints/0 holding the weights as params and EMA) with the official sampling settings
(configs/infer/TiTok/titok_*.yaml), so `tesserax sample --workdir OUT` samples token ids
(pass `--config.tokenizer.dir` of the converted tokenizer to decode them). The key map is
generators/maskgit.py `official_keys`; `model.embeddings.position_ids` (a buffer older
transformers versions saved) is accepted and not kept.
"""
import os
import re

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util

import tesserax.tasks  # noqa: F401  (registers the token generator task)
from tesserax.backbones import weights
from tesserax.convert import torch_reader, vae_checkpoints
from tesserax.core import checkpoint, config as config_lib, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.generators import maskgit
from tesserax.tokenizers import maskgit_vqgan, titok, tokenizer
from tesserax.training import task as task_lib

MASKGIT_KIND = "maskgit-vqgan-f16-256"
# kind -> tokenizers/titok.py CONFIGS name.
KINDS = {name.replace("_", "-"): name for name in titok.CONFIGS}
_RENAMES = ((r"\.attn\.qkv\.weight$", ".attn.in_proj_weight"),
            (r"\.attn\.qkv\.bias$", ".attn.in_proj_bias"),
            (r"\.attn\.proj\.", ".attn.out_proj."),
            (r"\.mlp\.fc1\.", ".mlp.c_fc."),
            (r"\.mlp\.fc2\.", ".mlp.c_proj."),
            (r"^decoder\.ffn_in\.", "decoder.ffn.0."),
            (r"^decoder\.ffn_out\.", "decoder.ffn.2."),
            (r"^codebook$", "quantize.embedding.weight"),
            (r"^pixel_codebook$", "pixel_quantize.embedding.weight"))
EMBED_PROB = "quantize.embed_prob"


def official_key(flax_key: str, shape) -> tuple:
  """(official key, (flax key, flax shape, perm)) of a tesserax parameter."""
  key, rule = weights._torch_rule(flax_key, tuple(shape))  # pylint: disable=protected-access
  for pattern, repl in _RENAMES:
    key = re.sub(pattern, repl, key)
  return key, rule


def rules(model_factory) -> dict:
  """{official key: (flax key, flax shape, perm)} of the network `model_factory` builds."""
  model = nnx.eval_shape(model_factory)
  return dict(official_key(".".join(map(str, path)), x.shape)
              for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def torch_shape(rule) -> tuple:
  _, shape, perm = rule
  return tuple(shape) if perm is None else tuple(shape[perm.index(i)] for i in range(len(perm)))




def _listed(keys):
  return f"{len(keys)}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"


def check(tensors, expected: dict, what: str, optional: dict = None) -> None:
  """One error listing the missing, unexpected and misshapen keys of `tensors` against
  `expected` {official key: shape} (`optional` keys may be absent)."""
  optional = optional or {}
  missing = [k for k in expected if k not in tensors.shapes]
  unexpected = [k for k in tensors.shapes if k not in expected and k not in optional]
  misshapen = [f"{k} {tuple(s)} (expected {tuple({**optional, **expected}[k])})"
               for k, s in tensors.shapes.items()
               if k in {**optional, **expected} and tuple(s) != tuple({**optional,
                                                                        **expected}[k])]
  problems = [f"{label} {_listed(keys)}" for label, keys in
              (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
  if problems:
    raise TesseraxError(f"{tensors.path.name} is not a {what} checkpoint: " + "; ".join(problems))


def params_of(src, factory, what: str, optional: dict = None) -> dict:
  """Flat tesserax params of the network `factory` builds from the official file `src`."""
  tensors = torch_reader.read_state_dict(src)
  key_rules = rules(factory)
  check(tensors, {k: torch_shape(r) for k, r in key_rules.items()}, what, optional)
  present = {k: s for k, s in (optional or {}).items() if k in tensors.shapes}
  return weights.convert(tensors, key_rules, dropped=present)


def convert_titok(kind: str, src, out_dir, stats=None, config=None) -> str:
  """Convert the official file `src` of `kind` into a new tokenizer directory `out_dir`;
  `config` (default: the kind's) serves files of the same family at other sizes. Returns the
  absolute out_dir."""
  if kind != MASKGIT_KIND and kind not in KINDS:
    raise TesseraxError(f"unknown --kind {kind!r}; choose from "
                        f"{', '.join([MASKGIT_KIND, *KINDS])}")
  if not os.path.isfile(src):
    raise TesseraxError(f"checkpoint file not found: {src}")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, tokenizer.PARAMS_FILE)):
    raise TesseraxError(f"{out_dir} already holds a tokenizer; convert into a new directory")
  if stats is not None and "vae" not in kind:
    raise TesseraxError(f"--stats is for the VAE kinds, not {kind}")
  if kind == MASKGIT_KIND:
    config = config or maskgit_vqgan.maskgit_vqgan_f16()
    params = params_of(src, lambda: maskgit_vqgan.MaskGitVQGAN(config, rngs=nnx.Rngs(0)),
                       "MaskGIT-VQGAN")
    return tokenizer.save(out_dir, kind, "maskgit_vqgan", config, params)
  config = config or titok.CONFIGS[KINDS[kind]]()
  optional = {EMBED_PROB: (config.codebook_size,)} if config.clustering_vq else None
  params = params_of(src, lambda: titok.build(config), kind, optional)
  latent_stats = None
  if config.quantize == "vae":
    latent_stats = (vae_checkpoints.read_stats(stats, config.token_size) if stats else
                    {"mean": np.zeros(config.token_size, np.float32),
                     "std": np.ones(config.token_size, np.float32)})
  return tokenizer.save(out_dir, kind, "titok", config, params, latent_stats)


# ---------------------------------------------------------------------------- generators

GENERATOR_KINDS = {"titok-generator-l32": "L-32", "titok-generator-b64": "B-64",
                   "titok-generator-s128": "S-128"}
# configs/infer/TiTok/titok_{l32,b64,s128}.yaml `model.generator` sampling settings.
GENERATOR_SAMPLING = {
    "L-32": dict(num_steps=8, randomize_temperature=9.5, guidance="linear", guidance_scale=4.5),
    "B-64": dict(num_steps=8, randomize_temperature=11.0, guidance="linear", guidance_scale=3.0),
    "S-128": dict(num_steps=64, randomize_temperature=2.8, guidance="power-cosine",
                  guidance_scale=6.9, guidance_scale_pow=3.0),
}
POSITION_IDS = "model.embeddings.position_ids"


def generator_rules(model_config) -> dict:
  """{official key: (flax key, flax shape, perm)} of a MaskGIT generator network, by the key
  map of generators/maskgit.py `official_keys`."""
  model = nnx.eval_shape(
      lambda: registry.NETWORKS.get(model_config.name)(model_config, rngs=nnx.Rngs(0)))
  shapes = {".".join(map(str, path)): tuple(x.shape)
            for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return {theirs: (ours, shapes[ours], (1, 0) if how == "transpose" else None)
          for ours, (theirs, how) in maskgit.official_keys(model_config).items()}


def generator_params(src, model_config, what) -> dict:
  """Flat tesserax params of a MaskGIT generator from the official file `src`."""
  tensors = torch_reader.read_state_dict(src)
  key_rules = generator_rules(model_config)
  optional = ({POSITION_IDS: (1, model_config.seq_len + 1)}
              if model_config.name == "maskgit_bert" else None)
  check(tensors, {k: torch_shape(r) for k, r in key_rules.items()}, what, optional)
  present = {k: s for k, s in (optional or {}).items() if k in tensors.shapes}
  return weights.convert(tensors, key_rules, dropped=present)


def generator_config(kind, overrides=None):
  """The workdir config of a generator kind: the token generator recipe (configs/
  digits_maskgit.py) with the released network (generators/maskgit.py maskgit_config), 1,000
  classes, the official sampling settings, no evaluator; then `overrides` ({"model.num_layers":
  "2", ...}, as from --config.KEY=VALUE)."""
  if kind not in GENERATOR_KINDS:
    raise TesseraxError(f"unknown --kind {kind!r}; choose from {', '.join(GENERATOR_KINDS)}")
  name = GENERATOR_KINDS[kind]
  config = config_lib.load("digits_maskgit")
  config.model = maskgit.maskgit_config(name)
  config.data.num_classes = 1000
  config.sample.update(GENERATOR_SAMPLING[name])
  config.sample.softmax_temperature_annealing = True
  config.evals = ml_collections.ConfigDict()
  config_lib.apply_overrides(config, overrides or {})
  return config


def convert_generator(kind, src, out_dir, overrides=None, stats=None) -> str:
  """Convert the official generator file `src` of `kind` into a new workdir `out_dir`."""
  if stats is not None:
    raise TesseraxError(f"--stats is for the VAE kinds, not {kind}")
  if not os.path.isfile(src):
    raise TesseraxError(f"checkpoint file not found: {src}")
  config = generator_config(kind, overrides)
  params = generator_params(src, config.model, kind)
  out_dir = os.path.abspath(out_dir)
  if any(os.path.exists(os.path.join(out_dir, f)) for f in ("config.json", "checkpoints")):
    raise TesseraxError(f"{out_dir} already holds a workdir; convert into a new directory")
  task = task_lib.build(config, sharding.make_mesh(config.mesh))
  pure = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in params.items()})
  pure = jax.tree.map(lambda x, sh: jax.device_put(x, sh), _int_keys(pure),
                      task.state_shardings["params"])
  state = train_state.new_state(pure, task.tx, config.seed, ema=pure)
  manager = checkpoint.make_manager(os.path.join(out_dir, "checkpoints"), config.checkpoint)
  checkpoint.save(manager, 0, state, {"next_index": 0}, force=True)
  manager.wait_until_finished()
  manager.close()
  config_lib.check_or_write_workdir_config(config, out_dir, write=True)
  return out_dir


def _int_keys(tree):
  """nnx pure dicts key list entries by int ("layers" -> {0: ...})."""
  if not isinstance(tree, dict):
    return tree
  return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
          for k, v in tree.items()}


for _kind in [MASKGIT_KIND, *KINDS]:
  registry.CONVERTERS.register(_kind, registry.Converter(convert_titok))
for _kind in GENERATOR_KINDS:
  registry.CONVERTERS.register(_kind, registry.Converter(convert_generator))
