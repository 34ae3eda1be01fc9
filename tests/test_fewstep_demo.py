"""`tesserax demo --fewstep` end to end at the tiny size: the teacher's solvers and every
student at its NFE in one table, and resuming without retraining."""
import json
import os

import pytest

from PIL import Image

from tesserax.demos import fewstep


@pytest.mark.long
def test_fewstep_demo_scores_teacher_and_students_and_resumes(digits_data_dir, tmp_path,
                                                              capsys, monkeypatch):
  from tesserax.core import config as config_lib
  load = config_lib.load

  def load_here(spec):  # every recipe reads the session's digits copy
    config = load(spec)
    config.data.data_dir = digits_data_dir
    return config

  monkeypatch.setattr(config_lib, "load", load_here)
  workdir = str(tmp_path / "fewstep")
  # A consistency student, and two on one pair cache: a two-stage one and one with a second
  # sampler (the flow-map jumps of 2-RF++ are MeanFlow's and the shortcut model's settings).
  students = ("ect", "slimflow", "2rfpp")
  results = fewstep.run(workdir, size="tiny", teacher_nfe=(1, 2), students=students)
  with open(os.path.join(workdir, "fewstep.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  models = saved["models"]
  assert sorted(models) == sorted([f"teacher/{s}" for s in fewstep.TEACHER_SOLVERS]
                                  + list(students) + ["2rfpp/new"])
  assert list(models["2rfpp/new"]) == ["4"]
  assert sorted(models["teacher/euler"], key=int) == ["1", "2"]
  assert sorted(models["teacher/heun"], key=int) == ["2"]
  for name in students:
    assert sorted(models[name], key=int) == [str(n) for n in fewstep.STUDENT_NFE]
  for runs in models.values():
    for entry in runs.values():
      assert entry["fid"] >= 0 and 0 <= entry["accuracy"] <= 1
  with open(os.path.join(workdir, "fewstep.md")) as f:
    assert len(f.read().splitlines()) == 2 + len(models) + 1 + 2
  assert Image.open(os.path.join(workdir, "fewstep.png")).size == (1280, 300)

  # Run again on the finished workdir (one teacher solver and the two-stage student, to keep it
  # short): every stage resumes at its end instead of training, and the scores repeat.
  capsys.readouterr()
  again = fewstep.run(workdir, size="tiny", teacher_nfe=(1,), students=("slimflow",))
  assert capsys.readouterr().out.count("resumed from") == 3  # the teacher, SlimFlow's 2 stages
  assert again["models"]["slimflow"] == results["models"]["slimflow"]
  assert again["models"]["teacher/euler"] == {"1": results["models"]["teacher/euler"]["1"]}
