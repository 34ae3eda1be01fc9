"""Malformed user files are refused in one line naming them, and outputs are complete or
absent: every command that reads an .npz, an image folder, a checkpoint or a tokenizer
directory ends with exit status 2, exactly one `error:` line on stderr naming the file and no
traceback; a command killed while writing leaves nothing at its output path."""
import glob
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tesserax import cli
from tesserax.backbones import weights
from tesserax.core import config as config_lib
from tesserax.core.errors import TesseraxError
from tesserax.core.files import read_npz
from tesserax.eval import reference
from tesserax.tokenizers import tokenizer
from tesserax.training import task as task_lib

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
IMAGES = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)


def one_line_error(capsys, argv, *names):
  """Runs the command; it must fail with status 2 and one `error:` line naming `names`."""
  capsys.readouterr()
  assert cli.main([str(a) for a in argv]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for name in names:
    assert str(name) in lines[0]
  return lines[0]


def npz_bytes(**arrays):
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def bad_npz(path, case):
  """Writes a malformed .npz of `case` at path; returns the words the error must contain."""
  good = npz_bytes(arr_0=IMAGES)
  if case == "truncated":
    path.write_bytes(good[:len(good) // 2])
    return "truncated or corrupt"
  if case == "corrupt":  # the data of a compressed member damaged
    buffer = io.BytesIO()
    np.savez_compressed(buffer, arr_0=IMAGES)
    data = bytearray(buffer.getvalue())
    data[100:200] = bytes(b ^ 0x55 for b in data[100:200])
    path.write_bytes(bytes(data))
    return "truncated or corrupt"
  if case == "empty":
    path.write_bytes(b"")
    return "is empty"
  if case == "text":
    path.write_text("arr_0: 1 2 3\n")
    return "is a text file"
  if case == "pickled":
    path.write_bytes(pickle.dumps({"arr_0": IMAGES}))
    return "holds Python objects (pickled); refusing to load"
  if case == "object_array":
    path.write_bytes(npz_bytes(arr_0=np.array([IMAGES, None], dtype=object)))
    return "holds Python objects (pickled); refusing to load"
  if case == "float_images":
    path.write_bytes(npz_bytes(arr_0=IMAGES.astype(np.float32)))
    return "arr_0 must be uint8 images [N, H, W, 3], got float32"
  if case == "grayscale":
    path.write_bytes(npz_bytes(arr_0=IMAGES[..., :1]))
    return "arr_0 must be uint8 images [N, H, W, 3], got uint8 (4, 16, 16, 1)"
  if case == "no_images":
    path.write_bytes(npz_bytes(arr_0=IMAGES[:0]))
    return "holds no images"
  assert case == "no_arr_0"
  path.write_bytes(npz_bytes(images=IMAGES))
  return "has no arr_0"


NPZ_CASES = ("truncated", "corrupt", "empty", "text", "pickled", "object_array", "float_images",
             "grayscale", "no_images", "no_arr_0")


@pytest.fixture
def ref(tmp_path):
  """A reference file enough for the Inception Score (which reads none of its keys)."""
  path = tmp_path / "ref.npz"
  np.savez(path, mu=np.zeros(3))
  return path


@pytest.mark.parametrize("case", NPZ_CASES)
def test_eval_refuses_a_malformed_samples_file(case, ref, tmp_path, capsys):
  samples = tmp_path / "samples.npz"
  words = bad_npz(samples, case)
  one_line_error(capsys, ["eval", "--samples", samples, "--ref", ref, "--metrics", "is"],
                 samples, words)


def test_eval_refuses_a_malformed_reference_and_image_folder(ref, tmp_path, capsys):
  bad = tmp_path / "bad_ref.npz"
  for case in ("truncated", "text", "object_array"):
    words = bad_npz(bad, case)
    one_line_error(capsys, ["eval", "--samples", tmp_path, "--ref", bad, "--metrics", "pr"],
                   bad, words)
  folder = tmp_path / "folder"
  folder.mkdir()
  for i, image in enumerate(IMAGES):
    Image.fromarray(image).save(folder / f"{i}.png")
  png = (folder / "2.png").read_bytes()
  (folder / "2.png").write_bytes(png[:len(png) // 2])
  one_line_error(capsys, ["eval", "--samples", folder, "--ref", ref, "--metrics", "is"],
                 folder / "2.png", "truncated or corrupt")
  (folder / "2.png").write_text("not an image")
  one_line_error(capsys, ["eval", "--samples", folder, "--ref", ref, "--metrics", "is"],
                 folder / "2.png")
  one_line_error(capsys, ["eval", "--samples", tmp_path / "none.npz", "--ref", ref,
                          "--metrics", "is"], tmp_path / "none.npz", "does not exist")


def test_eval_recon_refuses_malformed_and_mismatched_files(tmp_path, capsys):
  originals, reconstructions = tmp_path / "originals.npz", tmp_path / "recon.npz"
  np.savez(originals, arr_0=IMAGES)
  for case in ("truncated", "pickled", "no_images"):
    words = bad_npz(reconstructions, case)
    one_line_error(capsys, ["eval-recon", "--originals", originals, "--reconstructions",
                            reconstructions, "--metrics", "psnr"], reconstructions, words)
    one_line_error(capsys, ["eval-recon", "--originals", reconstructions, "--reconstructions",
                            originals, "--metrics", "psnr"], reconstructions, words)
  np.savez(reconstructions, arr_0=IMAGES[:3])
  one_line_error(capsys, ["eval-recon", "--originals", originals, "--reconstructions",
                          reconstructions, "--metrics", "psnr"], originals, reconstructions,
                 "[4, 16, 16, 3]", "[3, 16, 16, 3]")


def bad_checkpoint(path, case):
  """A malformed checkpoint at path; returns the words the error must contain."""
  if case == "empty":
    path.write_bytes(b"")
    return "not a safetensors file (0 bytes"
  if case == "not_json":
    path.write_bytes(struct.pack("<Q", 12) + b"tensors here")
    return "header is not JSON"
  if case == "not_an_object":
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    return "header is not a JSON object"
  if case == "header_past_eof":
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    return "header length 1000 goes past the end of the 10-byte file"
  if case == "bad_entry":
    header = json.dumps({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    return "tensor 'w' is not described by dtype, shape and data_offsets"
  if case == "data_past_eof":
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(8))
    return "tensor 'w' has inconsistent data offsets"
  if case == "npz_strings":
    path.write_bytes(npz_bytes(w=np.array(["a", "b"])))
    return "array 'w' has dtype <U1, not numbers"
  return bad_npz(path, case)


CHECKPOINT_CASES = {".safetensors": ("empty", "not_json", "not_an_object", "header_past_eof",
                                     "bad_entry", "data_past_eof"),
                    ".npz": ("truncated", "text", "pickled", "object_array", "npz_strings")}


@pytest.mark.parametrize("kind", ["dit-xl-2-256", "sd-vae-ft-mse"])
def test_convert_refuses_a_malformed_checkpoint(kind, tmp_path, capsys):
  for suffix, cases in CHECKPOINT_CASES.items():
    for case in cases:
      src = tmp_path / f"{case}{suffix}"
      words = bad_checkpoint(src, case)
      one_line_error(capsys, ["convert", "--kind", kind, "--src", src, "--out",
                              tmp_path / "out"], src, words)
  assert not (tmp_path / "out").exists()


def test_convert_refuses_a_pt_that_weights_only_loading_refuses(tmp_path, capsys):
  torch = pytest.importorskip("torch")

  class Payload:
    def __reduce__(self):
      return (os.system, ("touch " + str(tmp_path / "ran"),))

  torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "code.pt")
  torch.save(torch.zeros(2), tmp_path / "tensor.pt")
  (tmp_path / "text.pt").write_text("tensors")
  for name, words in (("code.pt", "holds Python objects (pickled); refusing to load"),
                      ("text.pt", "not a PyTorch file"),
                      ("tensor.pt", "holds a Tensor, not a dict of tensors")):
    one_line_error(capsys, ["convert", "--kind", "dit-xl-2-256", "--src", tmp_path / name,
                            "--out", tmp_path / "out"], tmp_path / name, words)
  assert not (tmp_path / "ran").exists()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  from test_latents import tiny_tokenizer
  return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), seed=0)


def _corrupt(directory, case):
  """Damages one file of a tokenizer directory; returns (that file, words of the error)."""
  params, config, stats = (directory / name for name in (
      tokenizer.PARAMS_FILE, tokenizer.CONFIG_FILE, tokenizer.STATS_FILE))
  if case in ("truncated", "object_array"):
    return params, bad_npz(params, case)
  if case == "config_not_json":
    config.write_text("{kind: vavae")
    return config, "is not JSON"
  if case == "config_without_model":
    config.write_text(json.dumps({"kind": "vavae-f16d32"}))
    return config, "is not a tokenizer config"
  if case == "config_of_another_network":
    config.write_text(json.dumps({"kind": "vavae-f16d32", "model": {"ch": 32}}))
    return config, "its model config does not build a kl_autoencoder network"
  if case == "stats_without_std":
    stats.write_bytes(npz_bytes(mean=np.zeros(4, np.float32)))
    return stats, "lacks std"
  assert case == "stats_of_another_shape"
  stats.write_bytes(npz_bytes(mean=np.zeros(8, np.float32), std=np.ones(8, np.float32)))
  return stats, "mean is float32 (8,); expected floats [4]"


@pytest.mark.parametrize("case", ["truncated", "object_array", "config_not_json",
                                  "config_without_model", "config_of_another_network",
                                  "stats_without_std", "stats_of_another_shape"])
def test_reconstruct_refuses_a_malformed_tokenizer_directory(case, tokenizer_dir, tmp_path,
                                                             capsys):
  directory = shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")
  path, words = _corrupt(directory, case)
  one_line_error(capsys, ["reconstruct", "--tokenizer", directory, "--data", "digits",
                          "--out", tmp_path / "out"], path, words)
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ atomic outputs


def disk_gone():
  raise OSError("disk gone")


def savez_half_then(stop, real_savez=np.savez, passes=0):
  """A stand-in for np.savez: `passes` files written whole, then half of the next, flushed,
  and stop()."""
  calls = []

  def savez(f, **arrays):
    calls.append(f)
    if len(calls) <= passes:
      return real_savez(f, **arrays)
    buffer = io.BytesIO()
    real_savez(buffer, **arrays)
    f.write(buffer.getvalue()[:buffer.tell() // 2])
    f.flush()
    return stop()
  return savez


def dump_half_then(stop, real_dump=json.dump):
  """A stand-in for json.dump: half of the file written, flushed, and stop()."""
  def dump(obj, f, **kwargs):
    buffer = io.StringIO()
    real_dump(obj, buffer, **kwargs)
    f.write(buffer.getvalue()[:buffer.tell() // 2])
    f.flush()
    return stop()
  return dump


class StandInTask:
  """What `sample` uses of a trained workdir's task: its config and a generator (black)."""
  config = config_lib.load("digits_dit:tiny")

  @staticmethod
  def generate(params, labels, key, settings, batch_size):
    return np.full((len(labels), 16, 16, 1), -1.0, np.float32)

  predict = {"generate": generate}


def stand_in_workdir(workdir):
  return StandInTask, {"ema": None}


KILLED_SAMPLE = textwrap.dedent("""
    # `tesserax sample` of a stand-in workdir, SIGKILLed with half of its output written.
    import os, signal, sys
    import numpy as np
    from tesserax import cli
    from tesserax.training import task
    from test_readers import savez_half_then, stand_in_workdir

    task.load_workdir = stand_in_workdir
    np.savez = savez_half_then(lambda: os.kill(os.getpid(), signal.SIGKILL))
    cli.main(["sample", "--workdir", "stand-in", "--num", "3", "--out", sys.argv[1]])
""")


def test_a_killed_sample_leaves_no_file_that_eval_accepts(ref, tmp_path, capsys):
  out = tmp_path / "samples.npz"
  run = subprocess.run([sys.executable, "-c", KILLED_SAMPLE, str(out)], cwd=TESTS_DIR,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == -signal.SIGKILL, run.stderr
  (partial,) = glob.glob(f"{out}.tmp*")  # the kill came mid-write
  assert not out.exists()
  one_line_error(capsys, ["eval", "--samples", out, "--ref", ref, "--metrics", "is"], out,
                 "does not exist")
  one_line_error(capsys, ["eval", "--samples", partial, "--ref", ref, "--metrics", "is"],
                 partial, "truncated or corrupt")


def test_sample_writes_exactly_the_out_path(tmp_path, monkeypatch):
  """np.savez given a path lacking ".npz" would add it; `sample` writes --out as given."""
  monkeypatch.setattr(task_lib, "load_workdir", stand_in_workdir)
  out = tmp_path / "samples"
  assert cli.main(["sample", "--workdir", "stand-in", "--num", "3", "--out", str(out)]) == 0
  assert os.listdir(tmp_path) == ["samples"]
  with np.load(out) as f:
    np.testing.assert_array_equal(f["arr_0"], np.zeros((3, 16, 16, 1), np.uint8))
    assert f["arr_1"].tolist() == [0, 1, 2]


def test_failed_writes_of_results_and_references_leave_nothing(tmp_path, monkeypatch, capsys):
  results = tmp_path / "results.json"
  monkeypatch.setattr(json, "dump", dump_half_then(disk_gone))
  with pytest.raises(OSError, match="disk gone"):
    cli._report({"fid": 1.5, "num_samples": 10}, str(results))  # pylint: disable=protected-access
  ref = tmp_path / "ref.npz"
  monkeypatch.setattr(np, "savez", savez_half_then(disk_gone))
  with pytest.raises(OSError, match="disk gone"):
    reference.save(ref, {"arr_0": IMAGES})
  assert os.listdir(tmp_path) == []
  one_line_error(capsys, ["eval", "--samples", tmp_path, "--ref", ref, "--metrics", "pr"], ref,
                 "does not exist")


def test_a_failed_tokenizer_rewrite_keeps_the_old_one_or_is_refused(tokenizer_dir, tmp_path,
                                                                     monkeypatch, capsys):
  """A rewrite that fails while writing leaves the old directory; one stopped while renaming
  the new files into place leaves no params.npz (the mark of a complete directory), so it is
  refused rather than read as old parameters with new statistics."""
  directory = shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")
  before = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
  loaded = tokenizer.load(directory)

  def rewrite():
    tokenizer.save(directory, "vavae-f16d32", "kl_autoencoder", loaded.config,
                   tokenizer.flat_params(loaded.model), {"mean": np.ones(4), "std": np.ones(4)})

  with monkeypatch.context() as patch:
    patch.setattr(np, "savez", savez_half_then(disk_gone, passes=1))  # params, then stats
    with pytest.raises(OSError, match="disk gone"):
      rewrite()
  assert {name: (directory / name).read_bytes() for name in os.listdir(directory)} == before
  real_replace, renamed = os.replace, []

  def stopped_after_one_rename(src, dst):
    if renamed:
      disk_gone()
    renamed.append(dst)
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", stopped_after_one_rename)
  with pytest.raises(OSError, match="disk gone"):
    rewrite()
  assert renamed == [str(directory / tokenizer.STATS_FILE)]
  assert sorted(os.listdir(directory)) == [tokenizer.CONFIG_FILE, tokenizer.STATS_FILE]
  one_line_error(capsys, ["reconstruct", "--tokenizer", directory, "--data", "digits",
                          "--out", tmp_path / "out"], directory, "not a tokenizer directory")


def test_read_npz_reads_only_what_is_asked(tmp_path):
  path = tmp_path / "a.npz"
  np.savez(path, a=np.arange(3), b=np.array([IMAGES, None], dtype=object))
  assert read_npz(path, "test file", lambda names: ["a"])["a"].tolist() == [0, 1, 2]
  with pytest.raises(TesseraxError, match="test file .*a.npz holds Python objects"):
    read_npz(path, "test file")
