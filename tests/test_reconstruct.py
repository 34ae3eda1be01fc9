"""Tokenizer reconstruction: the torchvision Resize + CenterCrop protocol, the batched jitted
reconstruction, `tesserax reconstruct` and `tesserax eval-recon --tokenizer --data`.

Oracles: exact array slices and the crop-offset formula, decode(encode(x)) run eagerly, the
digits split read directly, and eval/metrics' psnr/ssim of the written pairs.
"""
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from test_latents import tiny_tokenizer
from tesserax import cli
from tesserax.data import pipeline
from tesserax.data.preprocess import resize_center_crop, to_model_range, to_uint8
from tesserax.eval import metrics
from tesserax.tokenizers import reconstruct, tokenizer

RESOLUTION = 16


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """A random-weight tokenizer directory (16x16 -> 8x8x4)."""
  return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), seed=1)


@pytest.fixture(scope="session")
def model(tokenizer_dir):
  return tokenizer.load(tokenizer_dir).model


def digits_test_images(data_dir, num):
  cfg = ml_collections.ConfigDict(dict(
      name="digits", data_dir=data_dir, manual_dir="", resolution=RESOLUTION, split="test",
      random_flip=False, num_classes=10))
  images = np.concatenate(list(pipeline.iterate_split(cfg, "test", limit=num)))
  return np.repeat(images, 3, axis=-1)


def read_folder(folder):
  return np.stack([np.asarray(Image.open(os.path.join(folder, n)))
                   for n in sorted(os.listdir(folder))])


def test_resize_center_crop_follows_torchvision():
  rng = np.random.default_rng(0)
  # Short side already at size: no resize; top = round((h - 16) / 2) with Python's round.
  for h, top in ((21, 2), (23, 4), (16, 0)):
    arr = rng.integers(0, 256, (h, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(Image.fromarray(arr), 16),
                                  arr[top:top + 16])
    np.testing.assert_array_equal(resize_center_crop(Image.fromarray(arr.transpose(1, 0, 2)),
                                                     16), arr.transpose(1, 0, 2)[:, top:top + 16])
  # 30 x 45 (w x h) to 20: resized to 20 x int(20 * 45 / 30) = 20 x 30, crop rows 5..25.
  arr = rng.integers(0, 256, (45, 30, 3), dtype=np.uint8)
  resized = np.asarray(Image.fromarray(arr).resize((20, 30), Image.BILINEAR))
  np.testing.assert_array_equal(resize_center_crop(Image.fromarray(arr), 20), resized[5:25])
  constant = Image.fromarray(np.full((37, 53, 3), (10, 200, 77), np.uint8))
  out = resize_center_crop(constant, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to([10, 200, 77], (16, 16, 3)))
  gray = resize_center_crop(Image.fromarray(np.full((16, 16), 9, np.uint8)), 16)
  np.testing.assert_array_equal(gray, np.full((16, 16, 3), 9))


def test_reconstruct_is_decode_of_the_posterior_mean(model):
  images = np.random.default_rng(1).uniform(-1, 1, (5, RESOLUTION, RESOLUTION, 3))
  expected = np.clip(np.asarray(model.decode(model.encode(images.astype(np.float32)))), -1, 1)
  out = reconstruct.reconstruct(model, images, batch_size=3)  # two batches, the last padded
  assert out.shape == images.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_a_grayscale_tokenizer_reconstructs_the_first_channel_tiled(tmp_path):
  model = tokenizer.load(tiny_tokenizer(tmp_path / "gray", seed=3, channels=1)).model
  gray = np.random.default_rng(4).uniform(-1, 1, (3, RESOLUTION, RESOLUTION, 1))
  gray = gray.astype(np.float32)
  expected = np.clip(np.asarray(model.decode(model.encode(gray))), -1, 1)
  out = reconstruct.reconstruct(model, np.repeat(gray, 3, axis=-1), batch_size=2)
  assert out.shape == (3, RESOLUTION, RESOLUTION, 3)
  np.testing.assert_allclose(out, np.repeat(expected, 3, axis=-1), atol=1e-5)


def test_reconstruct_command_and_eval_recon_on_digits(tokenizer_dir, model, digits_data_dir,
                                                      tmp_path, capsys):
  out = tmp_path / "recon"
  assert cli.main(["reconstruct", "--tokenizer", tokenizer_dir, "--data", "digits",
                   "--data_dir", digits_data_dir, "--num", "6", "--batch_size", "4",
                   "--out", str(out)]) == 0
  originals = read_folder(out / "originals")
  reconstructions = read_folder(out / "reconstructions")
  assert sorted(os.listdir(out / "originals")) == [f"{i:05d}.png" for i in range(6)]
  np.testing.assert_array_equal(originals, digits_test_images(digits_data_dir, 6))
  expected = to_uint8(reconstruct.reconstruct(model, to_model_range(originals), batch_size=4))
  np.testing.assert_array_equal(reconstructions, expected)
  assert Image.open(out / "pairs.png").size == (4 * (2 * 64 + 1) + 1, 2 * (64 + 1) + 1)

  results = tmp_path / "results.json"
  assert cli.main(["eval-recon", "--tokenizer", tokenizer_dir, "--data", "digits",
                   "--data_dir", digits_data_dir, "--num", "6", "--batch_size", "4",
                   "--metrics", "psnr,ssim", "--out", str(results)]) == 0
  scores = json.loads(results.read_text())
  assert scores["num_samples"] == 6
  np.testing.assert_allclose(scores["psnr"], metrics.psnr(originals, reconstructions).mean(),
                             rtol=1e-12)
  np.testing.assert_allclose(scores["ssim"],
                             np.asarray(metrics.ssim(originals, reconstructions)).mean(),
                             rtol=1e-6)
  capsys.readouterr()


def test_reconstruct_command_reads_an_image_folder(tokenizer_dir, tmp_path):
  rng = np.random.default_rng(2)
  folder = tmp_path / "val" / "n01"
  folder.mkdir(parents=True)
  sizes = ((20, 16), (16, 23), (33, 40))
  for i, (w, h) in enumerate(sizes):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
  out = tmp_path / "recon"
  assert cli.main(["reconstruct", "--tokenizer", tokenizer_dir, "--data", str(tmp_path / "val"),
                   "--resolution", str(RESOLUTION), "--out", str(out)]) == 0
  expected = np.stack([resize_center_crop(Image.open(folder / f"{i}.JPEG"), RESOLUTION)
                       for i in range(len(sizes))])
  np.testing.assert_array_equal(read_folder(out / "originals"), expected)


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "--tokenizer", "{tmp}/none", "--data", "digits", "--out", "{tmp}/o"],
     "tokenizer directory not found"),
    (["reconstruct", "--tokenizer", "{tmp}", "--data", "digits", "--out", "{tmp}/o"],
     "not a tokenizer directory"),
    (["reconstruct", "--tokenizer", "{tok}", "--data", "digits", "--resolution", "32",
      "--out", "{tmp}/o"], "--resolution 32 differs from the tokenizer's 16"),
    (["eval-recon", "--tokenizer", "{tok}", "--data", "digits", "--originals", "{tmp}",
      "--reconstructions", "{tmp}"], "either --originals and --reconstructions, or"),
    (["eval-recon", "--metrics", "psnr"], "either --originals and --reconstructions, or"),
    (["eval-recon", "--tokenizer", "{tok}"], "--tokenizer and --data go together"),
    (["reconstruct", "--tokenizer", "{tok}", "--data", "nowhere", "--out", "{tmp}/o"],
     "neither an image folder nor a dataset name"),
])
def test_bad_input_is_one_line_error(tokenizer_dir, tmp_path, capsys, args, message):
  args = [a.format(tmp=tmp_path, tok=tokenizer_dir) for a in args]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_data_encode_help(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["data", "encode", "--help"])
  assert e.value.code == 0
  assert "latent cache" in capsys.readouterr().out
