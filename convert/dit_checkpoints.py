"""Official DiT, SiT and LightningDiT checkpoints <-> tesserax workdirs.

  convert(kind, src, out_dir)   an official file -> a workdir that `tesserax sample` reads
  export(workdir, dst)          a workdir's EMA (or raw) params -> the official layout

Kinds (the files released by facebookresearch/DiT, willisma/SiT and hustvl/LightningDiT):
  dit-xl-2-256, dit-xl-2-512      DiT-XL-2-{256x256,512x512}.pt, a flat state_dict
  sit-xl-2-256                    SiT-XL-2-256x256.pt, learned sigma (8 output channels)
  lightningdit-xl-1-64ep, -800ep  lightningdit-xl-imagenet256-{64ep,800ep}.pt
A file holding {"ema": state_dict, ...} (train.py checkpoints of all three repositories; their
find_model / inference.py read checkpoint["ema"] when present) is read through its "ema" entry;
its other entries (raw weights, optimizer, args) are not the EMA model's and are not read.

The key map follows the official module names: Linear weight = kernel.T, Conv OIHW = HWIO
transposed, fused qkv kept fused (rows [q | k | v]), and `x_embedder.proj`, `t_embedder.mlp.0/2`,
`y_embedder.embedding_table`, `*.adaLN_modulation.1`, RMSNorm `weight` = scale. Every key of
the source is consumed exactly once: each parameter is copied, and the buffers (`pos_embed`,
LightningDiT's `feat_rope.freqs_cos/sin`) are checked against their recomputation, which is
what tesserax uses (buffers are never checkpointed). Missing, unexpected or misshapen keys are
an error that lists them.

Each model's time convention is wrapped by its model config (generators/dit.py): DiT is a
DDPM model on integer steps (time_scale 1000, objective 'ddpm', whose `velocity` serves the flow
samplers); SiT and LightningDiT take t = 0 as noise (`time_convention='t0_noise'`).
"""
import os
import re

import jax
import numpy as np
from flax import nnx

import tesserax.tasks  # noqa: F401  (registers the diffusion task)
from tesserax.convert import torch_reader
from tesserax.core import checkpoint, config as config_lib, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.generators import dit
from tesserax.nn import layers
from tesserax.training import task as task_lib

# kind -> the recipe (configs/) whose config the workdir gets.
KINDS = {
    "dit-xl-2-256": "dit_xl2:256",
    "dit-xl-2-512": "dit_xl2:512",
    "sit-xl-2-256": "sit_xl2",
    "lightningdit-xl-1-64ep": "lightningdit_xl1:64ep",
    "lightningdit-xl-1-800ep": "lightningdit_xl1:800ep",
}

# tesserax name -> official name, applied in order to the dotted parameter path.
_RENAMES = (("x_embedder.", "x_embedder.proj."),
            ("y_embedder.embedding", "y_embedder.embedding_table.weight"),
            ("t_embedder.mlp_", "t_embedder.mlp."),
            ("adaLN_modulation.", "adaLN_modulation.1."))
# Buffers are recomputed exactly; checkpoints may differ by float rounding (DiT's EMA also
# averages the constant pos_embed), a wrong layout by O(1).
_BUFFER_ATOL = 1e-3


def official_key(path) -> str:
  key = ".".join(str(p) for p in path)
  for ours, theirs in _RENAMES:
    key = key.replace(ours, theirs)
  return re.sub(r"\.(kernel|scale)$", ".weight", key)


def _axes(path):
  """The official layout's axes in tesserax's: Conv OIHW of HWIO, Linear [out, in] of the
  kernel [in, out], anything else as is."""
  if path == ("x_embedder", "kernel"):
    return (3, 2, 0, 1)
  return (1, 0) if path[-1] == "kernel" else None


def _to_official(path, value):
  axes = _axes(path)
  return value if axes is None else np.transpose(value, axes)


def _from_official(path, value):
  axes = _axes(path)
  return value if axes is None else np.transpose(value, np.argsort(axes))


def _flatten(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _param_shapes(model_config) -> dict:
  """{path: shape} of the tesserax parameters (shape-evaluated, not initialised)."""
  model = nnx.eval_shape(lambda: dit.DiT(model_config, rngs=nnx.Rngs(0)))
  return {path: tuple(x.shape)
          for path, x in _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def buffers(model_config) -> dict:
  """The official buffers of `model_config`, recomputed as tesserax does: {key: float32}."""
  c = model_config
  grid = c.input_size // c.patch_size
  out = {"pos_embed": layers.sincos_pos_embed_2d(c.hidden_size, grid)[None].astype(np.float32)}
  if dit.option(c, "rope"):
    cos, sin = layers.rope_tables(c.hidden_size // c.num_heads, grid)
    out["feat_rope.freqs_cos"] = cos.astype(np.float32)
    out["feat_rope.freqs_sin"] = sin.astype(np.float32)
  return out


def official_shapes(model_config) -> dict:
  """{official key: torch-layout shape} of every array in an official state_dict."""
  shapes = {}
  for path, shape in _param_shapes(model_config).items():
    axes = _axes(path) or range(len(shape))
    shapes[official_key(path)] = tuple(shape[a] for a in axes)
  shapes.update({k: v.shape for k, v in buffers(model_config).items()})
  return shapes


def _summary(keys) -> str:
  """Keys with block indices folded: 'blocks.{0..27}.mlp.fc1.weight', in first-seen order."""
  groups = {}
  for key in keys:
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    pattern, index = (match.group(2), int(match.group(1))) if match else (key, None)
    groups.setdefault(pattern, []).append(index)
  parts = []
  for pattern, indices in groups.items():
    if indices == [None]:
      parts.append(pattern)
      continue
    indices = sorted(indices)
    contiguous = indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 2
    span = (f"{indices[0]}..{indices[-1]}" if contiguous else ",".join(map(str, indices)))
    parts.append(f"blocks.{{{span}}}.{pattern}" if len(indices) > 1
                 else f"blocks.{indices[0]}.{pattern}")
  return ", ".join(parts)


def params_from_state_dict(state_dict: dict, model_config, what: str = "checkpoint") -> dict:
  """tesserax params (a pure dict of float32) from an official state_dict, consuming every key
  exactly once; anything missing, unexpected, misshapen or a buffer that does not match its
  recomputation is a TesseraxError naming it."""
  shapes = official_shapes(model_config)
  found = {k: tuple(np.shape(v)) if isinstance(v, np.ndarray) else type(v).__name__
           for k, v in state_dict.items()}
  missing = [k for k in shapes if k not in found]
  unexpected = [k for k in found if k not in shapes]
  misshapen = [f"{k} {list(found[k]) if isinstance(found[k], tuple) else found[k]} "
               f"(expected {list(shapes[k])})"
               for k in shapes if k in found and found[k] != tuple(shapes[k])]
  problems = ([f"missing {len(missing)}: {_summary(missing)}"] if missing else []) + \
             ([f"unexpected {len(unexpected)}: {_summary(unexpected)}"] if unexpected else []) + \
             ([f"wrong shape {len(misshapen)}: {', '.join(misshapen)}"] if misshapen else [])
  if problems:
    raise TesseraxError(f"{what} does not match the model ({_describe(model_config)}): "
                        + "; ".join(problems))
  for key, expected in buffers(model_config).items():
    error = float(np.max(np.abs(np.asarray(state_dict[key], np.float64) - expected)))
    if not error <= _BUFFER_ATOL:
      raise TesseraxError(f"{what}: {key} differs from its recomputation for "
                          f"{_describe(model_config)} by {error:.3g}; a different layout?")
  flat = {p: np.asarray(_from_official(p, state_dict[official_key(p)]), np.float32)
          for p in _param_shapes(model_config)}
  return _unflatten(flat)


def state_dict_from_params(params: dict, model_config) -> dict:
  """The official state_dict (NumPy, torch layout) of tesserax params, buffers included."""
  state_dict = {official_key(p): np.ascontiguousarray(_to_official(p, np.asarray(v)))
                for p, v in _flatten(params).items()}
  state_dict.update(buffers(model_config))
  return state_dict


def _describe(c) -> str:
  extras = [f"{k}={dit.option(c, k)}" for k in ("mlp", "norm", "rope", "qk_norm")
            if dit.option(c, k) != dit.OPTIONS[k]]
  return (f"depth {c.depth}, hidden {c.hidden_size}, {c.num_heads} heads, patch {c.patch_size}, "
          f"input {c.input_size}x{c.input_size}x{c.in_channels}, "
          f"learn_sigma={c.learn_sigma}" + "".join(", " + e for e in extras))


def load_official(src: str) -> dict:
  """The state_dict in `src`, read through its "ema" entry where it has one."""
  content = torch_reader.read(src)
  if isinstance(content.get("ema"), dict):
    content = content["ema"]
  return content


def kind_config(kind: str, overrides: dict | None = None):
  """The workdir config of `kind`: its recipe, float32 compute (the published numbers sample in
  fp32), then `overrides` ({"model.depth": "2", ...}, as from --config.KEY=VALUE)."""
  if kind not in KINDS:
    raise TesseraxError(f"unknown --kind {kind!r}; choose from {', '.join(KINDS)}")
  config = config_lib.load(KINDS[kind])
  config.model.dtype = "float32"
  config_lib.apply_overrides(config, overrides or {})
  if config.data.resolution != config.model.input_size:
    raise TesseraxError(f"data.resolution {config.data.resolution} must equal model.input_size "
                        f"{config.model.input_size} (the latent grid)")
  return config


def convert(kind: str, src: str, out_dir: str, overrides: dict | None = None,
            stats=None) -> str:
  """Convert the official file `src` of `kind` into a new workdir `out_dir`: config.json (the
  kind's recipe) and checkpoints/0 holding the weights as params and EMA, a fresh optimizer
  state and data position, so `tesserax sample --workdir OUT_DIR` samples from it and
  `--init_from OUT_DIR/checkpoints` fine-tunes it. Returns the absolute out_dir."""
  if stats is not None:
    raise TesseraxError(f"--stats is for the VAE kinds, not {kind}")
  config = kind_config(kind, overrides)
  params = params_from_state_dict(load_official(src), config.model, what=f"{src} ({kind})")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, "config.json")) or \
     os.path.exists(os.path.join(out_dir, "checkpoints")):
    raise TesseraxError(f"{out_dir} already holds a workdir; convert into a new directory")
  task = task_lib.build(config, sharding.make_mesh(config.mesh))
  params = jax.device_put(params, task.state_shardings["params"])
  state = train_state.new_state(params, task.tx, config.seed, ema=params)
  manager = checkpoint.make_manager(os.path.join(out_dir, "checkpoints"), config.checkpoint)
  checkpoint.save(manager, 0, state, {"next_index": 0}, force=True)
  manager.wait_until_finished()
  manager.close()
  config_lib.check_or_write_workdir_config(config, out_dir, write=True)
  return out_dir


def export(workdir: str, dst: str, which: str = "ema") -> dict:
  """Write the `which` ('ema' or 'params') weights of a DiT-family workdir to `dst` in the
  official layout (.safetensors, or .pt / .pth with PyTorch), as a flat state_dict that the
  official code loads with load_state_dict; the buffers are the recomputed ones (a source's
  agree with them to float rounding). Returns the state_dict."""
  if which not in ("ema", "params"):
    raise TesseraxError(f"export which={which!r}; choose 'ema' or 'params'")
  task, state = task_lib.load_workdir(workdir)
  if task.config.model.name != "dit":
    raise TesseraxError(f"{workdir} holds a {task.config.model.name!r} model, not the DiT family")
  params = jax.tree.map(sharding.global_to_host, state[which])
  state_dict = state_dict_from_params(params, task.config.model)
  torch_reader.write(dst, state_dict)
  return state_dict


for _kind in KINDS:
  registry.CONVERTERS.register(_kind, registry.Converter(convert, export))
