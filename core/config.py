"""Configs: loading a recipe file, command-line overrides and the workdir's config.json.

A recipe is a Python file with `get_config(arg=None)` returning an ml_collections.ConfigDict
(configs/*.py). `config.task` names the task (training/task.py) that trains it;
`config.evals.NAME = {type, every_steps, ...}` its periodic evaluators (eval/evaluators.py).
`--config.a.b=VALUE` overrides an existing key; VALUE is parsed as a Python
literal when it is one (numbers, booleans, tuples), else taken as a string. An unknown key or a
value of the wrong type is refused with a one-line error.
"""
import ast
import copy
import importlib.util
import json
import os

import ml_collections

from tesserax.core.errors import TesseraxError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Keys that may change when a run resumes in the same workdir: they change how long it runs,
# what it logs and where its data lives, not what it computes.
RESUMABLE_KEYS = ("num_steps", "log_every_steps", "checkpoint", "sample", "evals", "demo",
                  "export", "mesh", "data.data_dir", "data.manual_dir")


def base_config() -> ml_collections.ConfigDict:
  """Trainer defaults shared by every recipe; recipes override what they need."""
  return ml_collections.ConfigDict(dict(
      task="diffusion",
      seed=0,
      num_steps=1000,
      batch_size=256,
      ema_decay=0.9999,
      log_every_steps=50,
      mesh=dict(fsdp=1, tensor=1),
      optim=dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
                 schedule="constant", end_lr_factor=0.0, grad_clip=0.0),
      checkpoint=dict(every_steps=500, keep=3, keep_every=0, use_async=True),
      # The sampler of sample grids and periodic evaluation (a recipe's published setting):
      # `solver` a registered sampler (euler, heun: flow; ddpm, ddim: DDPM models), guidance
      # only for t in `interval`, on the first `guided_channels` channels (None: all; 3 is the
      # official DiT/LightningDiT quirk behind their published FIDs).
      sample=dict(every_steps=0, num_per_class=8, solver="euler", num_steps=32, shift=1.0,
                  cfg_scale=1.0, interval=(0.0, 1.0), guided_channels=None,
                  final_correction=True),
      # Periodic evaluators, NAME: {type, every_steps, ...} (eval/evaluators.py).
      evals=dict(),
  ))


def resolve_path(name: str) -> str:
  """A config path, or the name of a file in the packaged configs/ folder."""
  for candidate in (name, os.path.join(CONFIGS_DIR, name), os.path.join(CONFIGS_DIR, name + ".py")):
    if os.path.isfile(candidate):
      return candidate
  available = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and f[0] != "_")
  raise TesseraxError(f"config file not found: {name} (packaged configs: {', '.join(available)})")


def load(spec: str) -> ml_collections.ConfigDict:
  """Load `path[:arg]` and call its get_config(arg)."""
  path, _, arg = spec.partition(":")
  path = resolve_path(path)
  module_spec = importlib.util.spec_from_file_location("tesserax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def upgrade(saved: dict) -> dict:
  """A config.json written before `task` and `evals` existed, in today's layout: the task from
  the model, the single `eval` section as one evaluator (its `kind` becoming the type, the
  demo's `nfe` and `cfg_scale` moving to `demo`), missing sample defaults filled in."""
  config = copy.deepcopy(saved)
  if "task" not in config:
    tokenizer = config["model"]["name"] == "kl_autoencoder"
    config["task"] = "autoencoder" if tokenizer else "diffusion"
    old = config.pop("eval", None)
    if old is not None:
      kind = old.pop("kind", "digits")
      demo = {k: old.pop(k) for k in ("nfe", "cfg_scale") if k in old}
      if demo:
        config["demo"] = demo
      kind_type = {"digits": "recon_digits", "inception": "recon"}[kind] if tokenizer else kind
      config["evals"] = {kind: dict(type=kind_type, **old)}
      if tokenizer:
        config["export"] = {"num_images": old["num_samples"]}
  sample = base_config().sample.to_dict()
  config["sample"] = dict(sample, **config.get("sample", {}))
  return config


def from_json(path: str) -> ml_collections.ConfigDict:
  """The (upgraded) config of a workdir's config.json."""
  with open(path) as f:
    return ml_collections.ConfigDict(upgrade(json.load(f)))


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict,
                    flag: str = "config") -> None:
  """Apply {"a.b": "VALUE"} overrides (given as --FLAG.a.b=VALUE) in place."""
  for dotted, text in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for i, key in enumerate(parents):
      if key not in node or not isinstance(node[key], ml_collections.ConfigDict):
        raise TesseraxError(f"unknown {flag} key {'.'.join(parents[:i + 1])!r} in "
                            f"--{flag}.{dotted}")
      node = node[key]
    if leaf not in node:
      raise TesseraxError(f"unknown {flag} key {dotted!r}; keys under "
                          f"{'.'.join([flag] + parents)}: {', '.join(sorted(node.keys()))}")
    value = _parse_value(text)
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
      value = text
    try:
      node[leaf] = value
    except TypeError:
      raise TesseraxError(f"--{flag}.{dotted}={text}: expected a value of type "
                          f"{type(old).__name__}") from None


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _resumable(name: str) -> bool:
  return any(name == k or name.startswith(k + ".") for k in RESUMABLE_KEYS)


def check_or_write_workdir_config(config: ml_collections.ConfigDict, workdir: str,
                                  write: bool) -> None:
  """Refuse a workdir whose config.json differs from `config` in a key that changes what the run
  computes; otherwise (re)write config.json when `write` (process 0)."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      saved = upgrade(json.load(f))
    a, b = _flatten(saved), _flatten(current)
    # An option added since the workdir was written, at its off value, changes nothing.
    added_off = lambda k: (k not in a and b[k] in (False, None)) or (k not in b and
                                                                     a[k] in (False, None))
    diffs = [k for k in sorted(set(a) | set(b))
             if not _resumable(k) and a.get(k) != b.get(k) and not added_off(k)]
    if diffs:
      shown = ", ".join(f"{k} ({a.get(k)!r} there, {b.get(k)!r} now)" for k in diffs[:3])
      raise TesseraxError(f"workdir {workdir} was written by a different config: {shown}"
                          f"{' and more' if len(diffs) > 3 else ''}; use a new --workdir")
  if write:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(current, f, indent=2)
    os.replace(path + ".tmp", path)
