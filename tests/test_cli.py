"""The command line end to end: train -> sample -> eval, the trainer's periodic evaluation,
reference batches of a dataset split, and Inception metrics of an image folder."""
import json
import os

import numpy as np
from PIL import Image

from tesserax import cli
from tesserax.backbones import weights
from tesserax.eval import metrics, reference


def test_train_sample_eval_with_periodic_evaluation(digits_data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--config", "digits_dit:tiny", "--workdir", workdir,
                   f"--config.data.data_dir={digits_data_dir}",
                   "--config.evals.digits.every_steps=2", "--config.sample.num_steps=2"]) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [line for line in map(json.loads, f) if "eval/digits/fid" in line]
  assert [e["step"] for e in evals] == [2, 4]
  assert all(e["eval/digits/fid"] > 0 and 0 <= e["eval/digits/accuracy"] <= 1 for e in evals)

  out = str(tmp_path / "samples.npz")
  assert cli.main(["sample", "--workdir", workdir, "--num", "30", "--sampler", "heun",
                   "--steps", "2", "--cfg", "2.0", "--out", out]) == 0
  with np.load(out) as data:
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (30, 16, 16, 1)
    np.testing.assert_array_equal(data["arr_1"], np.arange(30) % 10)
  scores = str(tmp_path / "scores.json")
  assert cli.main(["eval", "--samples", out, "--metrics", "fid_digits,accuracy",
                   "--out", scores]) == 0
  with open(scores) as f:
    result = json.load(f)
  assert result["fid_digits"] > 0 and 0 <= result["accuracy"] <= 1
  # --sample.KEY=VALUE reaches the sampler (a DDIM sampler on this flow model is refused in
  # one line), and a flag given explicitly wins over it.
  capsys.readouterr()
  ddim = ["sample", "--workdir", workdir, "--num", "2", "--sample.solver=ddim",
          "--sample.final_correction=False", "--out", str(tmp_path / "s.npz")]
  assert cli.main(ddim) == 2
  assert capsys.readouterr().err == "error: ddim needs epsilon; this model gives velocity\n"
  assert cli.main(ddim + ["--sampler", "heun"]) == 0
  capsys.readouterr()
  assert cli.main(["sample", "--workdir", workdir, "--num", "4", "--label", "12",
                   "--out", out]) == 2
  assert "--label 12 is outside [0, 10)" in capsys.readouterr().err
  assert cli.main(["sample", "--workdir", workdir, "--num", "4", "--sample.steps=3",
                   "--out", out]) == 2
  assert "unknown sample key 'steps'; keys under sample:" in capsys.readouterr().err


def _random_inception(cache):
  from test_inception import random_state_dict
  np.savez(cache / "pt_inception-2015-12-05-6726825d.npz", **random_state_dict(seed=5))


def test_reference_of_a_split_and_inception_score_of_a_folder(tmp_path, monkeypatch, capsys):
  cache = tmp_path / "cache"
  cache.mkdir()
  _random_inception(cache)
  monkeypatch.setenv("TESSERAX_CACHE", str(cache))
  rng = np.random.default_rng(0)
  root = tmp_path / "folder"
  images = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
  for i, image in enumerate(images):
    (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / f"class{i % 2}" / f"{i}.png")
  data_dir = str(tmp_path / "tfds")
  assert cli.main(["data", "build", "image_folder", "--manual_dir", str(root), "--resolution",
                   "16", "--data_dir", data_dir]) == 0
  ref_path = str(tmp_path / "ref.npz")
  assert cli.main(["data", "reference", "image_folder", "--manual_dir", str(root),
                   "--resolution", "16", "--data_dir", data_dir, "--keep", "4",
                   "--out", ref_path]) == 0
  model = weights.load("inception", cache)
  ref = reference.load(ref_path, metrics=("fid", "sfid", "pr"))
  assert ref["arr_0"].shape == (4, 16, 16, 3)
  # The split in its stored order, scored directly, gives the same statistics.
  stored = np.concatenate([np.stack([np.asarray(Image.open(p)) for p in sorted(
      (root / c).iterdir())]) for c in ("class0", "class1")])
  direct = reference.compute(stored, inception=model, keep_images=0)
  order = [np.flatnonzero((stored == img).all(axis=(1, 2, 3)))[0] for img in ref["arr_0"]]
  assert len(set(order)) == 4
  np.testing.assert_allclose(ref["mu"], direct["mu"], rtol=1e-10, atol=1e-12)

  folder = tmp_path / "samples"
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i:03d}.png")
  out = str(tmp_path / "is.json")
  capsys.readouterr()
  assert cli.main(["eval", "--samples", str(folder), "--ref", ref_path, "--metrics", "is",
                   "--out", out]) == 0
  with open(out) as f:
    got = json.load(f)
  expected = metrics.generation_metrics(images, ref, ("is",), inception=model)
  assert got["is"] == expected["is"] and got["num_samples"] == 10
  assert cli.main(["eval", "--samples", str(folder), "--metrics", "fid"]) == 2
  assert "--ref REF.npz is needed" in capsys.readouterr().err


def test_convert_refuses_a_missing_file_in_one_line(tmp_path, capsys):
  assert cli.main(["convert", "--kind", "sd-vae-ft-mse", "--src", str(tmp_path / "no.safetensors"),
                   "--out", str(tmp_path / "out")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == [f"error: checkpoint file not found: {tmp_path / 'no.safetensors'}"]
  assert not (tmp_path / "out").exists()
