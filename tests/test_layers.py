"""The package's folders form layers (DESIGN.md, "Layout and layers"): every import, at module
level or inside a function, goes from a folder to one it may use, never the other way; and no
two modules share a name across folders."""
import ast
import collections
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOWER_15 = {"core", "nn", "data", "backbones", "sampling", "objectives"}
# folder -> the folders it may import (besides itself), from DESIGN.md's table.
ALLOWED = {
    "core": set(),
    "nn": {"core"},
    "data": {"core"},
    "backbones": {"core", "nn", "data"},
    "sampling": {"core"},
    "objectives": {"core", "sampling"},
    "tokenizers": LOWER_15,
    "generators": LOWER_15,
    "eval": {"core", "nn", "data", "backbones", "sampling"},
    "training": {"core", "nn", "data", "backbones", "sampling", "eval"},
    "tasks": LOWER_15 | {"tokenizers", "generators", "eval", "training"},
    "convert": LOWER_15 | {"tokenizers", "generators", "eval", "training", "tasks"},
}
ALLOWED["demos"] = set(ALLOWED)
ALLOWED["cli"] = set(ALLOWED)
SKIPPED = {"tests", "benchmarks", "configs"}  # beside the layers, free to use any of them


def package_folders():
  """The top-level folders that are packages (not build/, *.egg-info/, .git/ ...)."""
  return sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def package_modules():
  """{path: folder} of the package's modules in layered folders (cli.py is 'cli')."""
  modules = {ROOT / "cli.py": "cli"} if (ROOT / "cli.py").exists() else {}
  for folder in package_folders():
    if folder not in SKIPPED:
      modules.update({path: folder for path in (ROOT / folder).rglob("*.py")})
  return modules


def imported_folders(path):
  """(line, folder) of each `tesserax.FOLDER` import in the file, functions included."""
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
      names = names[:1] if node.module != "tesserax" else names[1:]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "tesserax" and len(parts) > 1:
        yield node.lineno, parts[1].removesuffix(".py")


def layer_violations():
  problems = []
  for path, folder in sorted(package_modules().items()):
    for line, target in imported_folders(path):
      if target == folder or target in SKIPPED and folder in ("cli", "demos"):
        continue
      if target not in ALLOWED.get(folder, set()):
        problems.append(f"{path.relative_to(ROOT)}:{line}: {folder}/ imports {target}/")
  return problems


def test_imports_follow_the_layers():
  problems = layer_violations()
  assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_every_module_is_in_a_layer():
  folders = set(package_folders())
  assert folders - SKIPPED <= set(ALLOWED), folders - SKIPPED - set(ALLOWED)


def test_every_package_is_installed():
  """pyproject.toml lists every folder with an __init__.py, so `pip install .` ships it."""
  import tomllib
  with open(ROOT / "pyproject.toml", "rb") as f:
    listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
  folders = {"tesserax." + ".".join(p.relative_to(ROOT).parts[:-1])
             for folder in package_folders() for p in (ROOT / folder).rglob("__init__.py")}
  assert folders | {"tesserax"} == listed, (folders - listed, listed - folders - {"tesserax"})


def test_module_names_are_unique_across_folders():
  by_name = collections.defaultdict(list)
  for path in package_modules():
    if path.name != "__init__.py":
      by_name[path.stem].append(str(path.relative_to(ROOT)))
  clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
  assert not clashes, clashes


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
  """The oracle works: a data/ module importing tokenizers/ inside a function is named."""
  fake = tmp_path / "data"
  fake.mkdir()
  (fake / "__init__.py").write_text("")
  (fake / "bad.py").write_text("def f():\n  from tesserax.tokenizers import tokenizer\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  assert layer_violations() == ["data/bad.py:2: data/ imports tokenizers/"]


@pytest.mark.parametrize("module", ["tesserax.data.pipeline", "tesserax.core.sharding"])
def test_low_layers_import_light(module):
  """Importing the data pipeline loads no network (the old pipeline pulled in the KL
  autoencoder, DINOv2, Inception and VGG)."""
  code = (f"import sys, {module}; heavy = [m for m in sys.modules if m.startswith("
          "('tesserax.tokenizers', 'tesserax.backbones', 'tesserax.generators', "
          "'tesserax.training', 'tesserax.tasks'))]; print(heavy); assert not heavy")
  subprocess.run([sys.executable, "-c", code], check=True)
