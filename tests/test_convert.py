"""Converters of the official DiT, SiT and LightningDiT checkpoints.

Synthetic checkpoints carry the official key names and shapes (tests/test_dit_family.py
`official_shapes`, at a tiny depth and width) and random values, written by this file's own
safetensors writer. A converted workdir must reproduce the float64 NumPy forward pass of the
official architecture (`numpy_forward`) to 1e-5 relative, export back to identical arrays, and
sample through the trainer; wrong files are refused with the offending keys listed.
"""
import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tesserax.convert import dit_checkpoints as convert_dit
from tesserax.convert import torch_reader
from tesserax.core.errors import TesseraxError
from tesserax.generators import dit
from tesserax.objectives import ddpm
from tesserax.sampling.ddpm_sampler import make_ddpm_sampler
from tesserax.core import checkpoint, sharding
from tesserax.training import task as task_lib
from test_dit_family import numpy_forward, official_shapes, random_state_dict

# One worker builds the module fixtures (compiled once) under `--dist loadgroup`.
pytestmark = pytest.mark.xdist_group("converted_dit")

# kind: (tiny official architecture, overrides that shrink the kind's recipe to it)
TINY = {
    "dit-xl-2-256": dict(depth=2, hidden=32, heads=4, patch=2, in_channels=4, grid=4,
                         learn_sigma=True),
    "sit-xl-2-256": dict(depth=2, hidden=32, heads=4, patch=2, in_channels=4, grid=4,
                         learn_sigma=True),
    "lightningdit-xl-1-800ep": dict(depth=2, hidden=64, heads=4, patch=1, in_channels=32, grid=4,
                                    learn_sigma=False, lightning=True),
}


def overrides(arch):
  size = arch["grid"] * arch["patch"]
  return {"model.depth": str(arch["depth"]), "model.hidden_size": str(arch["hidden"]),
          "model.num_heads": str(arch["heads"]), "model.patch_size": str(arch["patch"]),
          "model.input_size": str(size),
          "data.resolution": str(size)}


def write_safetensors(path, state_dict):
  """The safetensors format: u64 header length, JSON header, raw little-endian data."""
  header, blobs, offset = {}, [], 0
  for name, value in state_dict.items():
    blob = np.ascontiguousarray(value, "<f4").tobytes()
    header[name] = {"dtype": "F32", "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  header["__metadata__"] = {"format": "pt"}
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
  with open(path, "rb") as f:
    size = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(size))
    data = f.read()
  dtypes = {"F32": "<f4"}
  return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]],
                           dtypes[v["dtype"]]).reshape(v["shape"])
          for k, v in header.items() if k != "__metadata__" and v["dtype"] in dtypes}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
  """kind -> (official state_dict, source path, workdir)."""
  out = {}
  for i, (kind, arch) in enumerate(TINY.items()):
    root = tmp_path_factory.mktemp(kind)
    sd = random_state_dict(official_shapes(**arch), seed=i, hidden=arch["hidden"],
                           grid=arch["grid"], heads=arch["heads"])
    src = str(root / "official.safetensors")
    write_safetensors(src, sd)
    workdir = convert_dit.convert(kind, src, str(root / "workdir"), overrides(arch))
    out[kind] = (sd, src, workdir)
  return out


def _float64_model(model_config, params):
  config = ml_collections.ConfigDict(model_config.to_dict())
  config.dtype = "float64"
  graphdef, _, buffers = nnx.split(dit.DiT(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  return nnx.merge(graphdef, params, nnx.to_pure_dict(buffers))


@pytest.mark.parametrize("kind", list(TINY))
def test_converted_checkpoint_reproduces_the_official_forward(converted, kind):
  sd, _, workdir = converted[kind]
  arch = TINY[kind]
  setup, state = task_lib.load_workdir(workdir)
  rng = np.random.default_rng(7)
  size = arch["grid"] * arch["patch"]
  x = rng.standard_normal((3, arch["in_channels"], size, size))
  t = np.array([0.0, 0.37, 0.999])  # tesserax flow time, t = 1 noise
  y = np.array([0, 7, 1000])        # 1000 is the null class
  out_channels = arch["in_channels"] * (2 if arch["learn_sigma"] else 1)
  with jax.enable_x64(True):
    model = _float64_model(setup.config.model, jax.device_get(state["ema"]))
    with jax.default_matmul_precision("highest"):
      ours = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                              jnp.asarray(y)))
  if kind.startswith("dit"):  # DiT: DDPM steps k = 1000 t (objective 'ddpm', time_scale 1000)
    ref = numpy_forward(sd, x, 1000 * t, y, depth=2, heads=arch["heads"], patch=arch["patch"],
                        out_channels=out_channels)
  else:  # SiT / LightningDiT: t = 0 noise, v = x_data - eps: fed 1 - t, negated
    ref = -numpy_forward(sd, x, 1 - t, y, depth=2, heads=arch["heads"], patch=arch["patch"],
                         out_channels=out_channels, lightning=arch.get("lightning", False))
  ref = ref.transpose(0, 2, 3, 1)
  assert ours.shape == ref.shape == (3, size, size, out_channels)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_qk_norm_option_reproduces_the_official_forward():
  arch = dict(TINY["lightningdit-xl-1-800ep"], qk_norm=True)
  sd = random_state_dict(official_shapes(**arch), seed=5, hidden=64, grid=4, heads=4)
  config = convert_dit.kind_config("lightningdit-xl-1-800ep",
                                   dict(overrides(arch), **{"model.qk_norm": "True"}))
  params = convert_dit.params_from_state_dict(sd, config.model)
  x = np.random.default_rng(8).standard_normal((2, 32, 4, 4))
  t, y = np.array([0.2, 0.9]), np.array([3, 1000])
  with jax.enable_x64(True):
    ours = np.asarray(_float64_model(config.model, params)(
        jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y)))
  ref = -numpy_forward(sd, x, 1 - t, y, depth=2, heads=4, patch=1, out_channels=32,
                       lightning=True, qk_norm=True).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind", list(TINY))
def test_convert_then_export_round_trips_to_identical_arrays(converted, kind, tmp_path):
  sd, _, workdir = converted[kind]
  dst = str(tmp_path / "exported.safetensors")
  convert_dit.export(workdir, dst)
  back = read_safetensors(dst)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("kind", list(TINY))
def test_converted_workdir_samples_through_the_trainer(converted, kind):
  """What `tesserax sample --workdir` runs: the flow samplers on the objective's velocity (for
  DiT, the DDPM model seen in flow time), with guidance."""
  _, _, workdir = converted[kind]
  setup, state = task_lib.load_workdir(workdir)
  labels = np.array([1, 2], np.int32)
  settings = setup.config.sample.copy_and_resolve_references()
  settings.update(solver="euler", num_steps=2, shift=1.0, cfg_scale=2.0, interval=(0.0, 0.9),
                  guided_channels=None)
  images = setup.predict["generate"](state["ema"], labels, jax.random.PRNGKey(0), settings)
  size = setup.config.model.input_size
  assert images.shape == (2, size, size, setup.config.model.in_channels)
  assert np.all(np.isfinite(images))
  if kind.startswith("dit"):  # and DiT's own sampler, on the same checkpoint
    apply = lambda p, x, s, y: ddpm.predict(setup.apply, p, x, s, y)
    sampler = make_ddpm_sampler(apply, method="ddpm", num_steps=3, cfg_scale=1.5,
                                guided_channels=3, null_label=1000)
    noise = jax.random.normal(jax.random.PRNGKey(1), images.shape)
    out = sampler(state["ema"], noise, jnp.asarray(labels), jax.random.PRNGKey(2))
    assert out.shape == images.shape and np.all(np.isfinite(out))


def test_ema_entry_is_read(converted, tmp_path):
  """{"ema": state_dict, ...} (train.py checkpoints) is read through "ema"."""
  torch = pytest.importorskip("torch")
  sd, _, _ = converted["lightningdit-xl-1-800ep"]
  src = str(tmp_path / "ckpt.pt")
  torch.save({"ema": {k: torch.from_numpy(v) for k, v in sd.items()}, "opt": {}}, src)
  arch = TINY["lightningdit-xl-1-800ep"]
  workdir = convert_dit.convert("lightningdit-xl-1-800ep", src, str(tmp_path / "w"),
                                overrides(arch))
  _, state = task_lib.load_workdir(workdir)
  np.testing.assert_array_equal(state["ema"]["blocks"][1]["mlp"]["w3"]["kernel"],
                                sd["blocks.1.mlp.w3.weight"].T)


def _convert_error(kind, sd, tmp_path, arch=None):
  tmp_path.mkdir(parents=True, exist_ok=True)
  src = str(tmp_path / "bad.safetensors")
  write_safetensors(src, sd)
  out = tmp_path / "out"
  with pytest.raises(TesseraxError) as error:
    convert_dit.convert(kind, src, str(out), overrides(arch or TINY[kind]))
  assert not out.exists()  # nothing written
  message = str(error.value)
  assert "\n" not in message
  return message


def test_missing_unexpected_and_misshapen_keys_are_listed(converted, tmp_path):
  sd = dict(converted["dit-xl-2-256"][0])
  del sd["blocks.1.attn.proj.bias"]
  sd["blocks.0.extra.weight"] = np.zeros(3, np.float32)
  sd["t_embedder.mlp.2.weight"] = np.zeros((32, 31), np.float32)
  message = _convert_error("dit-xl-2-256", sd, tmp_path)
  assert "missing 1: blocks.1.attn.proj.bias" in message
  assert "unexpected 1: blocks.0.extra.weight" in message
  assert "t_embedder.mlp.2.weight [32, 31] (expected [32, 32])" in message


def test_another_architecture_or_size_is_refused(converted, tmp_path):
  dit_sd = converted["dit-xl-2-256"][0]
  message = _convert_error("lightningdit-xl-1-800ep", dit_sd, tmp_path / "a",
                           arch=dict(TINY["lightningdit-xl-1-800ep"], hidden=32, patch=2))
  assert "blocks.{0,1}.mlp.w12.weight" in message and "blocks.{0,1}.mlp.fc1.weight" in message
  assert "feat_rope.freqs_cos" in message  # missing
  assert "final_layer.linear.weight [32, 32] (expected [128, 32])" in message  # 2x2x8 vs 2x2x32
  # A 512-px DiT (an 8x8 grid here) is not a 256-px one.
  big = dict(TINY["dit-xl-2-256"], grid=8)
  big_sd = random_state_dict(official_shapes(**big), seed=3, hidden=32, grid=8)
  message = _convert_error("dit-xl-2-256", big_sd, tmp_path / "b")
  assert "pos_embed [1, 64, 32] (expected [1, 16, 32])" in message
  # A pos_embed of the right shape but another layout (h and w swapped).
  swapped = dict(dit_sd)
  swapped["pos_embed"] = dit_sd["pos_embed"].reshape(1, 4, 4, 32).transpose(0, 2, 1, 3).reshape(
      1, 16, 32)
  assert "pos_embed differs from its recomputation" in _convert_error("dit-xl-2-256", swapped,
                                                                      tmp_path / "c")


def test_a_converted_checkpoint_of_another_model_is_refused_by_the_trainer(converted):
  """--init_from a converted LightningDiT into a DiT run lists the mismatching arrays."""
  _, _, workdir = converted["lightningdit-xl-1-800ep"]
  config = convert_dit.kind_config("dit-xl-2-256", overrides(TINY["dit-xl-2-256"]))
  setup = task_lib.build(config, sharding.make_mesh(config.mesh))
  with pytest.raises(TesseraxError, match="different model.*mlp"):
    checkpoint.restore_params(os.path.join(workdir, "checkpoints"), setup.abstract_state,
                              config.checkpoint)


def test_file_errors(tmp_path):
  with pytest.raises(TesseraxError, match="does not exist"):
    torch_reader.read(str(tmp_path / "nothing.safetensors"))
  with pytest.raises(TesseraxError, match="not found"):
    torch_reader.read(str(tmp_path / "nothing.pt"))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(struct.pack("<Q", 1000) + b"{}")
  with pytest.raises(TesseraxError, match="not a safetensors file"):
    torch_reader.read(str(bad))
  with pytest.raises(TesseraxError, match="unknown --kind"):
    convert_dit.convert("dit-xxl", str(bad), str(tmp_path / "o"))
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "config.json").write_text("{}")
  src = str(tmp_path / "ok.safetensors")
  arch = TINY["dit-xl-2-256"]
  write_safetensors(src, random_state_dict(official_shapes(**arch), seed=0, hidden=32, grid=4))
  with pytest.raises(TesseraxError, match="already holds a workdir"):
    convert_dit.convert("dit-xl-2-256", src, str(tmp_path / "used"), overrides(arch))


def test_numpy_safetensors_writer_reads_back(tmp_path):
  import ml_dtypes
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.array([1.5, -2.0], ml_dtypes.bfloat16), "c": np.arange(3, dtype=np.int64)}
  path = str(tmp_path / "x.safetensors")
  torch_reader.write(path, arrays)
  assert read_safetensors(path)["a"].tolist() == arrays["a"].tolist()  # this file's reader
  back = torch_reader.read(path)
  for key, value in arrays.items():
    np.testing.assert_array_equal(back[key], value.astype(np.float32))
  with open(path, "rb") as f:
    assert (8 + struct.unpack("<Q", f.read(8))[0]) % 8 == 0  # data 8-byte aligned


def test_sample_cli_ddim_with_the_official_guided_channels(converted, tmp_path, capsys):
  """`tesserax sample --sampler ddim --guided_channels 3 --tokenizer DIR` on a converted DiT
  equals the DDIM sampler applied to the model directly (noise fold_in(key, 0)) and decoded by
  the tokenizer (latents * std + mean); all-channel guidance gives other samples; a DDPM
  sampler on a flow model, or latents without a tokenizer, are refused in one line."""
  from test_latents import tiny_tokenizer
  from tesserax import cli
  from tesserax.tokenizers import tokenizer as tokenizer_lib
  from tesserax.data.preprocess import to_uint8
  _, _, workdir = converted["dit-xl-2-256"]
  tokenizer = tokenizer_lib.load(tiny_tokenizer(tmp_path / "tokenizer", seed=0)).model
  out = str(tmp_path / "s.npz")
  args = ["sample", "--workdir", workdir, "--num", "4", "--sampler", "ddim", "--steps", "3",
          "--cfg", "4.0", "--seed", "1", "--out", out, "--tokenizer", str(tmp_path / "tokenizer")]
  assert cli.main(args + ["--guided_channels", "3"]) == 0
  with np.load(out) as f:
    got, labels = f["arr_0"], f["arr_1"]
  setup, state = task_lib.load_workdir(workdir)
  c = setup.config
  shape = (4, c.data.resolution, c.data.resolution, c.model.in_channels)
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), 0), shape)
  sampler = make_ddpm_sampler(lambda p, x, s, y: ddpm.predict(setup.apply, p, x, s, y),
                              method="ddim", num_steps=3, cfg_scale=4.0, guided_channels=3,
                              null_label=c.model.num_classes)
  latents = sampler(state["ema"], noise, jnp.asarray(labels), jax.random.PRNGKey(0))
  want = np.clip(np.asarray(tokenizer.decode(latents)), -1, 1)  # stats: mean 0, std 1
  assert np.abs(got.astype(int) - to_uint8(want).astype(int)).max() <= 1
  assert cli.main(args) == 0  # guiding all 4 channels gives other samples
  with np.load(out) as f:
    assert np.abs(f["arr_0"].astype(int) - got.astype(int)).max() > 1
  _, _, flow_workdir = converted["sit-xl-2-256"]
  for bad in (["--workdir", flow_workdir, "--sampler", "ddpm", "--tokenizer", args[-1]],
              ["--workdir", workdir]):
    capsys.readouterr()
    assert cli.main(["sample", "--num", "2", "--out", out] + bad) == 2
    assert capsys.readouterr().err.count("\n") == 1
