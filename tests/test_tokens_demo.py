"""`tesserax demo --tokens` end to end at the tiny size: TiToks of two token counts, their
token cache and a MaskGIT over it, scored and plotted; the cache holds the exported TiTok's
own token ids of the training images."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tesserax.demos import tokens


@pytest.mark.long
def test_tokens_demo_trains_caches_generates_and_scores(digits_data_dir, tmp_path, monkeypatch):
  from tesserax.core import config as config_lib
  load = config_lib.load

  def load_here(spec):  # every recipe reads the session's digits copy
    config = load(spec)
    config.data.data_dir = config.data.data_dir or digits_data_dir
    return config

  monkeypatch.setattr(config_lib, "load", load_here)
  workdir = str(tmp_path / "tokens")
  results = tokens.run(workdir, size="tiny", token_counts=(4, 8), generator_tokens=8,
                       steps=(2, 4))
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  assert sorted(results["tokenizers"], key=int) == ["4", "8"]
  assert sorted(results["generator"], key=int) == ["2", "4"]
  for entry in [*results["tokenizers"].values(), *results["generator"].values()]:
    assert entry["fid"] >= 0
  for name in ("tokens.png", "reconstructions.png", "samples_grid.png"):
    assert Image.open(os.path.join(workdir, name)).size[0] > 0

  from tesserax.data import pipeline
  from tesserax.tokenizers import tokenizer
  model = tokenizer.load(os.path.join(workdir, "titok_8", "tokenizer")).model
  cache_config = config_lib.load("digits_maskgit:tiny")
  cache_config.data.update(data_dir=os.path.join(workdir, "cache"), resolution=8)
  ids, labels = pipeline.load_split(cache_config.data, "train")
  images, image_labels = pipeline.load_split(pipeline.image_config(cache_config.data), "train")
  assert ids.dtype == np.int32 and ids.shape == (len(images), 8)
  np.testing.assert_array_equal(labels, image_labels)
  np.testing.assert_array_equal(ids[:64], np.asarray(model.encode(images[:64])))
