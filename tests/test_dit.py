"""DiT against the official architecture: parameter counts, init, embeddings, FLOPs, and the
float64 NumPy forward of tests/test_dit_family.py (written from DiT models.py in the official
torch layout) at the model's own float64 and float32 precision."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tesserax.core.errors import TesseraxError
from tesserax.generators import dit
from tesserax.nn import layers
from test_dit_family import _random_model, numpy_forward  # the official forward in NumPy

SMALL = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=4,
             num_classes=5, learn_sigma=True)


def test_dit_xl2_parameter_count_is_the_official_one():
  # fast-DiT logs "DiT Parameters: 675,129,632" (performance/A100/*.out).
  assert dit.count_params(dit.dit_config("XL/2")) == 675_129_632


def test_official_key_table_shapes():
  """Every array of DiT-XL/2 has the shape of the released state_dict (torch layout)."""
  model = nnx.eval_shape(lambda: dit.DiT(dit.dit_config("XL/2"), rngs=nnx.Rngs(0)))
  state = nnx.to_pure_dict(nnx.state(model))
  assert state["pos_embed"].shape == (256, 1152)
  assert state["x_embedder"]["kernel"].shape == (2, 2, 4, 1152)  # HWIO of [1152, 4, 2, 2]
  assert state["y_embedder"]["embedding"].shape == (1001, 1152)
  assert state["t_embedder"]["mlp_0"]["kernel"].shape == (256, 1152)
  block = state["blocks"][27]
  assert block["attn"]["qkv"]["kernel"].shape == (1152, 3456)
  assert block["mlp"]["fc1"]["kernel"].shape == (1152, 4608)
  assert block["adaLN_modulation"]["kernel"].shape == (1152, 6912)
  assert state["final_layer"]["linear"]["kernel"].shape == (1152, 32)
  assert state["final_layer"]["adaLN_modulation"]["kernel"].shape == (1152, 2304)


def _numpy_pos_embed(dim, grid):
  """DiT's get_2d_sincos_pos_embed re-derived: w fills the first half, each half [sin, cos]."""
  out = np.zeros((grid * grid, dim))
  quarter = dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
  for i in range(grid):          # row (h)
    for j in range(grid):        # column (w)
      token = i * grid + j
      out[token, :quarter] = np.sin(j * omega)
      out[token, quarter:2 * quarter] = np.cos(j * omega)
      out[token, 2 * quarter:3 * quarter] = np.sin(i * omega)
      out[token, 3 * quarter:] = np.cos(i * omega)
  return out


def test_pos_embed_matches_the_official_formula():
  np.testing.assert_allclose(layers.sincos_pos_embed_2d(64, 4), _numpy_pos_embed(64, 4), atol=1e-12)


def test_init_follows_adaln_zero():
  config = dit.dit_config("S/2", **SMALL)
  model = dit.DiT(config, rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for block in state["blocks"].values():
    assert not np.any(block["adaLN_modulation"]["kernel"])
    bound = np.sqrt(6.0 / (32 + 96))  # xavier on the fused [3D, D] qkv
    qkv = np.asarray(block["attn"]["qkv"]["kernel"])
    assert qkv.max() <= bound and qkv.max() > 0.9 * bound
  assert not np.any(state["final_layer"]["linear"]["kernel"])
  assert abs(np.std(state["y_embedder"]["embedding"]) - 0.02) < 0.005
  x = jnp.ones((2, 8, 8, 3))
  assert not np.any(model(x, jnp.array([0.2, 0.7]), jnp.array([0, 5])))  # zero output at init


def _to_torch_layout(state):
  """tesserax params -> the official DiT state_dict layout (Linear W = kernel.T, conv OIHW)."""
  sd = {"pos_embed": state["pos_embed"][None],
        "x_embedder.proj.weight": state["x_embedder"]["kernel"].transpose(3, 2, 0, 1),
        "x_embedder.proj.bias": state["x_embedder"]["bias"],
        "y_embedder.embedding_table.weight": state["y_embedder"]["embedding"]}
  lin = lambda p, name: {f"{name}.weight": p["kernel"].T, f"{name}.bias": p["bias"]}
  sd.update(lin(state["t_embedder"]["mlp_0"], "t_embedder.mlp.0"))
  sd.update(lin(state["t_embedder"]["mlp_2"], "t_embedder.mlp.2"))
  for i, b in state["blocks"].items():
    sd.update(lin(b["attn"]["qkv"], f"blocks.{i}.attn.qkv"))
    sd.update(lin(b["attn"]["proj"], f"blocks.{i}.attn.proj"))
    sd.update(lin(b["mlp"]["fc1"], f"blocks.{i}.mlp.fc1"))
    sd.update(lin(b["mlp"]["fc2"], f"blocks.{i}.mlp.fc2"))
    sd.update(lin(b["adaLN_modulation"], f"blocks.{i}.adaLN_modulation.1"))
  sd.update(lin(state["final_layer"]["linear"], "final_layer.linear"))
  sd.update(lin(state["final_layer"]["adaLN_modulation"], "final_layer.adaLN_modulation.1"))
  return {k: np.asarray(v, np.float64) for k, v in sd.items()}


# float64 is limited by the float32 softmax inside jax.nn.dot_product_attention; a layout error
# would show up as O(1) differences.
@pytest.mark.parametrize("dtype,rtol", [("float64", 2e-6), ("float32", 3e-5)])
def test_forward_matches_float64_numpy_reference(dtype, rtol):
  with jax.enable_x64(dtype == "float64"):
    _check_forward(dtype, rtol)


def _check_forward(dtype, rtol):
  config = dit.dit_config("S/2", dtype=dtype, **SMALL)
  model = dit.DiT(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Random values everywhere (the zero-initialised adaLN and final layers too).
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(params))
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [0.2 * jax.random.normal(k, l.shape, dtype) for k, l in zip(keys, leaves)]
  params = jax.tree.unflatten(treedef, leaves)
  model = nnx.merge(graphdef, params, nnx.to_pure_dict(rest))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 8, 8, 3)).astype(dtype)
  t = np.array([0.0, 0.37, 1.0], dtype)
  y = np.array([0, 4, 5], np.int32)  # 5 is the null class
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)), np.float64)
  sd = _to_torch_layout(nnx.to_pure_dict(nnx.state(model)))
  ref = numpy_forward(sd, x.transpose(0, 3, 1, 2).astype(np.float64),
                      t.astype(np.float64) * 1000.0, y, depth=2, heads=4, patch=2, out_channels=6)
  ref = ref.transpose(0, 2, 3, 1)
  assert ours.shape == (3, 8, 8, 6)
  # Relative to the output's scale: float32 rounding of O(10) activations is ~1e-6 of it.
  np.testing.assert_allclose(ours, ref, rtol=0, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("name,count", [("S/2", 33), ("B/2", 130)])
def test_named_sizes_have_the_published_parameter_scale(name, count):
  # DiT paper Table 4 (millions, rounded by the paper).
  assert abs(dit.count_params(dit.dit_config(name)) / 1e6 - count) / count < 0.005


@pytest.mark.parametrize("name,input_size,gmacs,digits", [
    ("XL/2", 32, 118.6, 1), ("XL/2", 64, 524.5, 1), ("B/2", 32, 23.01, 2), ("S/8", 32, 0.36, 2)])
def test_forward_flops_match_the_papers_gflops(name, input_size, gmacs, digits):
  # DiT Table 4 "Gflops" are multiply-accumulates, printed to `digits` decimals.
  flops = dit.forward_flops(dit.dit_config(name, input_size=input_size))
  assert abs(flops / 2e9 - gmacs) <= 0.5 * 10 ** -digits + 1e-9


def test_second_time_input():
  """`second_time` adds an s_embedder (a copy of t_embedder) whose output joins c; without it
  the model, its parameter count and FLOPs are DiT's."""
  plain = dit.dit_config("S/2", **SMALL)
  assert dit.dit_config("S/2", **SMALL, second_time=False) == plain
  flow_map = dit.dit_config("S/2", **SMALL, second_time=True)
  del plain["second_time"]  # a config written before the option: still a DiT
  d, time_mlp = 32, 256 * 32 + 32 + 32 * 32 + 32
  assert dit.count_params(flow_map) == dit.count_params(plain) + time_mlp
  assert dit.forward_flops(flow_map) == dit.forward_flops(plain) + 2 * (256 * d + d * d)
  graphdef, params, rest = _random_model(plain, seed=1)
  model = nnx.merge(graphdef, params, rest)
  two = dit.DiT(flow_map, rngs=nnx.Rngs(0))
  # Built last: every other parameter is initialised as in the plain DiT.
  init = nnx.to_pure_dict(nnx.state(dit.DiT(plain, rngs=nnx.Rngs(0)), nnx.Param))
  init_two = nnx.to_pure_dict(nnx.state(two, nnx.Param))
  assert set(init_two) - set(init) == {"s_embedder"}
  jax.tree.map(np.testing.assert_array_equal, init, {k: init_two[k] for k in init})
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t, s, y = jnp.array([0.2, 0.7]), jnp.array([0.1, 0.4]), jnp.array([0, 5])
  with pytest.raises(TesseraxError, match="second_time"):
    model(x, t, y, s=s)
  with pytest.raises(TesseraxError, match="pass s"):
    two(x, t, y)
  # A zero s_embedder output leaves c = t_emb + y_emb: exactly the plain DiT.
  state = nnx.to_pure_dict(nnx.state(two, nnx.Param))
  state.update(params, s_embedder=jax.tree.map(np.zeros_like, state["s_embedder"]))
  nnx.update(two, state)
  np.testing.assert_array_equal(two(x, t, y, s=s), model(x, t, y))
  state["s_embedder"] = jax.tree.map(lambda a: 0.2 * np.ones_like(a), state["s_embedder"])
  nnx.update(two, state)
  out = two(x, t, y, s=s)
  assert np.abs(out - model(x, t, y)).max() > 1e-3
  assert np.abs(out - two(x, t, y, s=s[::-1])).max() > 1e-3
