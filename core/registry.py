"""Registries: a config name -> the constructor it selects.

Each registry maps the names a config or a command line may give to what they build:

  TASKS       config.task                 training/task.py's Task, built from (config, mesh)
  NETWORKS    config.model.name           a network class, built from (model config, rngs)
  OBJECTIVES  config.objective.name       objectives/context.py's Objective, from the config
  SAMPLERS    config.sample.solver        sampling/registry entries (what they consume)
  EVALUATORS  config.evals.NAME.type      eval/evaluators.py's evaluator builders
  TOKENIZERS  a tokenizer directory kind  the tokenizer network class
  CONVERTERS  tesserax convert --kind     readers of official checkpoints

A module registers its entries when it is imported; each package's __init__ imports its
registering modules (the one line a new family adds), and `import tesserax.tasks` brings in
every built-in entry. Names are fixed strings chosen by this code: a config never names a
Python object to import.
"""
from typing import Callable, NamedTuple

from tesserax.core.errors import TesseraxError


class Registry:
  """A name -> entry table that refuses duplicates and unknown names in one line."""

  def __init__(self, what: str, where: str):
    self.what, self.where = what, where
    self._entries = {}

  def register(self, name: str, entry=None):
    """Registers `entry` under `name`; without `entry`, a decorator doing so."""
    if entry is None:
      return lambda value: self.register(name, value)
    if name in self._entries and self._entries[name] is not entry:
      raise TesseraxError(f"{self.what} {name!r} is registered twice")
    self._entries[name] = entry
    return entry

  def get(self, name: str):
    if name not in self._entries:
      known = ", ".join(self.names()) or "none registered (import tesserax.tasks first)"
      raise TesseraxError(f"unknown {self.where} {name!r}; known: {known}")
    return self._entries[name]

  def names(self) -> tuple:
    return tuple(sorted(self._entries))


class Converter(NamedTuple):
  """A CONVERTERS entry: `convert(kind, src, out_dir, **options) -> out_dir` reads an official
  file into a tesserax directory; `export(workdir, dst)` writes one back, where supported."""
  convert: Callable
  export: Callable | None = None


TASKS = Registry("task", "config.task")
NETWORKS = Registry("network", "config.model.name")
OBJECTIVES = Registry("objective", "config.objective.name")
SAMPLERS = Registry("sampler", "sampler (config.sample.solver)")
EVALUATORS = Registry("evaluator", "config.evals.NAME.type")
TOKENIZERS = Registry("tokenizer", "tokenizer kind")
CONVERTERS = Registry("converter", "convert --kind")
