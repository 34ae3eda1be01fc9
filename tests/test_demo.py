"""`tesserax demo` end to end at the tiny size: outputs, their structure, and resuming."""
import json
import os

from PIL import Image

from tesserax.demos import demo


def test_demo_writes_grid_metrics_and_resumes(tiny_config, tmp_path, capsys):
  workdir = str(tmp_path / "demo")
  results = demo.run(tiny_config, workdir)
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  assert sorted(saved["euler"], key=int) == ["1", "2"]
  assert sorted(saved["heun"], key=int) == ["2"]  # 2 NFE per Heun step: no 1-NFE entry
  for entry in [saved["floor"], *saved["euler"].values(), *saved["heun"].values()]:
    assert entry["fid"] >= 0 and 0 <= entry["accuracy"] <= 1
  assert saved["floor"]["accuracy"] > 0.95  # the classifier recognises real training digits
  assert saved["step"] == tiny_config.num_steps
  grid = Image.open(os.path.join(workdir, "samples_grid.png"))
  assert grid.size[1] > grid.size[0] // 2  # one row per class
  assert Image.open(os.path.join(workdir, "nfe_sweep.png")).size == (1280, 300)

  capsys.readouterr()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = f.read()
  again = demo.run(tiny_config, workdir)
  assert "resumed from" in capsys.readouterr().out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == logged  # nothing was retrained
  assert again == results  # same checkpoint, same noise: the same figures
