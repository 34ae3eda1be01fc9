"""Configs: loading a recipe file, command-line overrides and the workdir's config.json.

A recipe is a Python file (configs/*.py) with `get_config()` returning an
ml_collections.ConfigDict, and `get_config(arg)` for each argument in its `ARGS` (`NAME:ARG`;
no argument when it has no ARGS). `config.task` names the task (training/task.py) that trains
it; `config.evals.NAME = {type, every_steps, ...}` its periodic evaluators (eval/evaluators.py).
`--config.a.b=VALUE` overrides an existing key; VALUE is parsed as a Python
literal when it is one (numbers, booleans, tuples), else taken as a string. An unknown key or a
value of the wrong type is refused with a one-line error, and `validate` refuses values that
make no sense (RULES) before a run creates anything.
"""
import ast
import copy
import importlib.util
import json
import math
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
  packaged = os.path.join(CONFIGS_DIR, name)
  for candidate in (name, packaged, packaged + ".py"):
    if os.path.isfile(candidate):
      return candidate
  available = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and f[0] != "_")
  raise TesseraxError(f"config file not found: {name} (packaged configs: {', '.join(available)})")


def load(spec: str) -> ml_collections.ConfigDict:
  """Load `path[:arg]` and call its get_config(arg); `arg` must be one of the recipe's ARGS."""
  name, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("tesserax_config", resolve_path(name))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not arg:
    return module.get_config()
  known = getattr(module, "ARGS", ())
  if arg not in known:
    takes = f"takes {' or '.join(known)}" if known else "takes no argument"
    raise TesseraxError(f"config {name} has no argument {arg!r}; it {takes}")
  return module.get_config(arg)


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


def _read_saved(path: str) -> dict:
  """A workdir's config.json, upgraded; a damaged one is refused in one line."""
  fix = "restore it (it records the run's config) or use a new --workdir"
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:  # not JSON, or not text
    raise TesseraxError(f"{path} is not valid JSON ({e}); {fix}") from None
  if not isinstance(saved, dict):
    raise TesseraxError(f"{path} holds a JSON {type(saved).__name__}, not a config object; {fix}")
  try:
    return upgrade(saved)
  except (KeyError, TypeError, AttributeError) as e:
    raise TesseraxError(f"{path} is not a tesserax config ({type(e).__name__}: {e}); "
                        f"{fix}") from None


def from_json(path: str) -> ml_collections.ConfigDict:
  """The (upgraded) config of a workdir's config.json."""
  return ml_collections.ConfigDict(_read_saved(path))


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


DTYPES = ("float32", "bfloat16", "float16")


def _integer(low):
  return lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number(ok):
  return lambda x: _is_number(x) and ok(x)


def _interval(x):
  return (isinstance(x, (tuple, list)) and len(x) == 2 and all(map(_is_number, x))
          and 0 <= x[0] < x[1] <= 1)


# (key, the rule as a person reads it, its check). `*` is every entry at that level; a key a
# recipe does not have is skipped. An interval of 0 steps turns the periodic action off.
RULES = (
    ("num_steps", "a positive integer", _integer(1)),
    ("batch_size", "a positive integer", _integer(1)),
    ("log_every_steps", "a positive integer", _integer(1)),
    ("ema_decay", "a number in [0, 1]", _number(lambda x: 0 <= x <= 1)),
    ("model.dtype", "one of " + ", ".join(DTYPES), lambda x: x in DTYPES),
    ("optim.lr", "a number > 0", _number(lambda x: x > 0)),
    ("optim.warmup_steps", "an integer >= 0", _integer(0)),
    ("optim.schedule", "constant or cosine", lambda x: x in ("constant", "cosine")),
    ("optim.grad_clip", "a number >= 0 (0: no clipping)", _number(lambda x: x >= 0)),
    ("checkpoint.every_steps", "a positive integer", _integer(1)),
    ("checkpoint.keep", "a positive integer", _integer(1)),
    ("checkpoint.keep_every", "an integer >= 0 (0: none)", _integer(0)),
    ("sample.every_steps", "an integer >= 0 (0: off)", _integer(0)),
    ("sample.num_per_class", "a positive integer", _integer(1)),
    ("sample.num_steps", "a positive integer", _integer(1)),
    ("sample.shift", "a number > 0", _number(lambda x: x > 0)),
    ("sample.cfg_scale", "a number >= 0 (1: no guidance)", _number(lambda x: x >= 0)),
    ("sample.interval", "(lo, hi) with 0 <= lo < hi <= 1", _interval),
    ("sample.guided_channels", "None or a positive integer",
     lambda x: x is None or _integer(1)(x)),
    ("evals.*.every_steps", "an integer >= 0 (0: off)", _integer(0)),
    ("evals.*.num_samples", "a positive integer", _integer(1)),
    ("evals.*.batch_size", "a positive integer", _integer(1)),
)
# A GAN tokenizer's discriminator optimizer (configs/digits_kl.py) follows the same rules.
RULES += tuple(("disc_" + key, rule, ok) for key, rule, ok in RULES if key.startswith("optim."))


def _values(config, key: str, prefix: str = ""):
  """(dotted key, value) of every entry `key` names in `config` (`*`: each child)."""
  head, _, rest = key.partition(".")
  names = list(config.keys()) if head == "*" else [head] if head in config else []
  for name in names:
    if not rest:
      yield prefix + name, config[name]
    elif isinstance(config[name], ml_collections.ConfigDict):
      yield from _values(config[name], rest, f"{prefix}{name}.")


def _check(config, prefix: str, label: str) -> None:
  for key, rule, ok in RULES:
    if key.startswith(prefix):
      for name, value in _values(config, key[len(prefix):], prefix):
        if not ok(value):
          raise TesseraxError(f"{label}{name}={value!r}: must be {rule}")


def validate_sample(settings: ml_collections.ConfigDict) -> None:
  """Refuse sample settings (a `sample` section, e.g. the sample command's) that break one of
  the `sample.*` RULES, in one line."""
  _check(settings, "sample.", "")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  """Refuse, in one line naming the key and the rule, a config that breaks one of RULES, or
  whose batch_size the mesh's ("data", "fsdp") devices or the processes do not divide.
  Default device and process counts: jax's."""
  _check(config, "", "config ")
  import jax
  from tesserax.core import sharding
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  data, fsdp, _ = sharding.mesh_shape(config.mesh, num_devices)
  batch = config.batch_size
  if batch % (data * fsdp):
    raise TesseraxError(f"config batch_size={batch}: must be divisible by the {data * fsdp} batch "
                        f"shards of the mesh (data {data} x fsdp {fsdp} on {num_devices} devices)")
  if batch % num_processes:
    raise TesseraxError(f"config batch_size={batch}: must be divisible by the {num_processes} "
                        "processes")


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
    a, b = _flatten(_read_saved(path)), _flatten(current)
    # An option added since the workdir was written, at its off value, changes nothing.
    off = lambda value: value in (False, None, "")
    added_off = lambda k: (k not in a and off(b[k])) or (k not in b and off(a[k]))
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
