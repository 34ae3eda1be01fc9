"""The DiT family (DiT, SiT, LightningDiT) against the official architectures.

The oracles are written here from the official module definitions (DiT models.py, SiT
models.py, LightningDiT models/lightningdit.py), not from tesserax's modules:
`official_shapes` lists every array of an official state_dict, `numpy_forward` is the official
forward pass in float64 NumPy on such a state_dict (NCHW, official time input).
tests/test_convert.py runs converted checkpoints against them; here they fix the parameter
counts of every named size.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tesserax.core import config as config_lib, sharding
from tesserax.demos import demo
from tesserax.generators import dit
from tesserax.training import task as task_lib

# size: (depth, hidden, heads) of DiT models.py and LightningDiT models/lightningdit.py.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
         "1p0B": (24, 1536, 24), "1p6B": (28, 1792, 28)}
DIT_NAMES = [f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (1, 2, 4, 8)]
LIGHTNINGDIT_NAMES = ["B/1", "B/2", "L/2", "XL/1", "XL/2", "1p0B/1", "1p0B/2", "1p6B/1",
                      "1p6B/2"]  # LightningDiT_models


def official_shapes(*, depth, hidden, heads, patch, in_channels, grid, learn_sigma,
                    lightning=False, qk_norm=False, num_classes=1000):
  """{key: torch shape} of an official DiT/SiT (lightning=False) or LightningDiT state_dict."""
  d, hd, mlp = hidden, hidden // heads, int(hidden * 4.0)
  out = in_channels * (2 if learn_sigma else 1)
  shapes = {"pos_embed": (1, grid * grid, d),
            "x_embedder.proj.weight": (d, in_channels, patch, patch), "x_embedder.proj.bias": (d,),
            "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
            "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
            "y_embedder.embedding_table.weight": (num_classes + 1, d)}
  linear = lambda name, o, i: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}
  for i in range(depth):
    b = f"blocks.{i}."
    shapes.update(linear(b + "attn.qkv", 3 * d, d))
    shapes.update(linear(b + "attn.proj", d, d))
    if lightning:
      h = int(2 / 3 * mlp)
      shapes.update(linear(b + "mlp.w12", 2 * h, d))
      shapes.update(linear(b + "mlp.w3", d, h))
      shapes.update({b + "norm1.weight": (d,), b + "norm2.weight": (d,)})
    else:
      shapes.update(linear(b + "mlp.fc1", mlp, d))
      shapes.update(linear(b + "mlp.fc2", d, mlp))
    if qk_norm:
      shapes.update({b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,)})
    shapes.update(linear(b + "adaLN_modulation.1", 6 * d, d))
  shapes.update(linear("final_layer.linear", patch * patch * out, d))
  shapes.update(linear("final_layer.adaLN_modulation.1", 2 * d, d))
  if lightning:
    shapes["final_layer.norm_final.weight"] = (d,)
    shapes["feat_rope.freqs_cos"] = shapes["feat_rope.freqs_sin"] = (grid * grid, hd)
  return shapes


def official_count(shapes):
  """What `sum(p.numel() for p in model.parameters())` prints: RoPE tables are buffers."""
  return sum(int(np.prod(s)) for k, s in shapes.items() if not k.startswith("feat_rope."))


def sincos_pos_embed(dim, grid):
  """get_2d_sincos_pos_embed: meshgrid(w, h) puts w in the first half, each half [sin, cos]."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  out = np.zeros((grid * grid, dim))
  for i in range(grid):        # row
    for j in range(grid):      # column
      out[i * grid + j] = np.concatenate([np.sin(j * omega), np.cos(j * omega),
                                          np.sin(i * omega), np.cos(i * omega)])
  return out


def eva_rope_tables(half_head_dim, seq_len, theta=10000.0):
  """VisionRotaryEmbeddingFast(dim=half_head_dim, pt_seq_len=seq_len), freqs_for='lang'."""
  freqs = 1.0 / theta ** (np.arange(0, half_head_dim, 2)[:half_head_dim // 2] / half_head_dim)
  t = np.arange(seq_len) / seq_len * seq_len
  freqs = np.repeat(np.einsum("i,f->if", t, freqs), 2, axis=-1)       # '... n -> ... (n r)'
  shape = (seq_len, seq_len, freqs.shape[-1])
  freqs = np.concatenate([np.broadcast_to(freqs[:, None, :], shape),   # broadcat, dim=-1
                          np.broadcast_to(freqs[None, :, :], shape)], axis=-1)
  freqs = freqs.reshape(-1, freqs.shape[-1])
  return np.cos(freqs), np.sin(freqs)


def random_state_dict(shapes, seed, *, hidden, grid, heads=None):
  """Random float32 values in the official layout; buffers from the official formulas."""
  rng = np.random.default_rng(seed)
  sd = {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
  sd["pos_embed"] = sincos_pos_embed(hidden, grid)[None].astype(np.float32)
  if "feat_rope.freqs_cos" in shapes:
    cos, sin = eva_rope_tables(hidden // heads // 2, grid)
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = cos.astype(np.float32), sin.astype(
        np.float32)
  return sd


def numpy_forward(sd, x, t, y, *, depth, heads, patch, out_channels, lightning=False,
                  qk_norm=False):
  """The official forward (DiT/SiT models.py, LightningDiT models/lightningdit.py) in float64
  on an official state_dict, NCHW in and out, t as the official model takes it. Returns the
  output before SiT's chunk of the learned-sigma half."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  linear = lambda h, name: h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
  silu = lambda h: h / (1 + np.exp(-h))
  gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))

  def layer_norm(h):
    mu = h.mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

  def rms_norm(h, name):
    return h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-6) * sd[f"{name}.weight"]

  def rope(q):  # q * cos + rotate_half(q) * sin, pairs (d r) with r = 2
    pairs = q.reshape(q.shape[:-1] + (-1, 2))
    rotated = np.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(q.shape)
    return q * sd["feat_rope.freqs_cos"] + rotated * sd["feat_rope.freqs_sin"]

  norm = (lambda h, name: rms_norm(h, name)) if lightning else (lambda h, name: layer_norm(h))
  modulate = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
  n, _, hh, ww = x.shape
  gh, gw = hh // patch, ww // patch
  w = sd["x_embedder.proj.weight"]
  tokens = np.zeros((n, gh * gw, w.shape[0]))
  for i in range(gh):
    for j in range(gw):
      crop = x[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
      tokens[:, i * gw + j] = np.einsum("ncab,dcab->nd", crop, w) + sd["x_embedder.proj.bias"]
  h = tokens + sd["pos_embed"]
  freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
  args = t[:, None] * freqs[None]
  t_freq = np.concatenate([np.cos(args), np.sin(args)], -1)
  cond = linear(silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
  cond = cond + sd["y_embedder.embedding_table.weight"][y]
  d = h.shape[-1]
  hd = d // heads
  for i in range(depth):
    b = f"blocks.{i}."
    mod = linear(silu(cond), b + "adaLN_modulation.1")
    s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = np.split(mod, 6, axis=-1)
    a = modulate(norm(h, b + "norm1"), s_msa, sc_msa)
    q, k, v = linear(a, b + "attn.qkv").reshape(n, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    if qk_norm:
      q, k = rms_norm(q, b + "attn.q_norm"), rms_norm(k, b + "attn.k_norm")
    if lightning:
      q, k = rope(q), rope(k)
    logits = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    attn = (p @ v).transpose(0, 2, 1, 3).reshape(n, -1, d)
    h = h + g_msa[:, None] * linear(attn, b + "attn.proj")
    m = modulate(norm(h, b + "norm2"), s_mlp, sc_mlp)
    if lightning:
      x1, x2 = np.split(linear(m, b + "mlp.w12"), 2, axis=-1)
      m = linear(silu(x1) * x2, b + "mlp.w3")
    else:
      m = linear(gelu(linear(m, b + "mlp.fc1")), b + "mlp.fc2")
    h = h + g_mlp[:, None] * m
  shift, scale = np.split(linear(silu(cond), "final_layer.adaLN_modulation.1"), 2, axis=-1)
  out = linear(modulate(norm(h, "final_layer.norm_final"), shift, scale), "final_layer.linear")
  out = out.reshape(n, gh, gw, patch, patch, out_channels)
  return np.einsum("nhwpqc->nchpwq", out).reshape(n, out_channels, gh * patch, gw * patch)


# ---------------------------------------------------------------------------- sizes


def _family_config(family, name, **overrides):
  return {"dit": dit.dit_config, "sit": dit.sit_config,
          "lightningdit": dit.lightningdit_config}[family](name, **overrides)


def _official_for(family, name):
  size, patch = name.split("/")
  depth, hidden, heads = SIZES[size]
  lightning = family == "lightningdit"
  in_channels, grid_px = (32, 16) if lightning else (4, 32)
  return dict(depth=depth, hidden=hidden, heads=heads, patch=int(patch),
              in_channels=in_channels, grid=grid_px // int(patch),
              learn_sigma=not lightning, lightning=lightning)


@pytest.mark.parametrize("family,names", [("dit", DIT_NAMES), ("sit", DIT_NAMES),
                                          ("lightningdit", LIGHTNINGDIT_NAMES)])
def test_every_named_size_has_the_official_parameter_count(family, names):
  """Counted at depth 1 and 2 from shapes (the count is affine in depth), then extrapolated
  to the named depth; the full-depth headline models are counted directly below."""
  for name in names:
    official = _official_for(family, name)
    config = _family_config(family, name)
    assert (config.depth, config.hidden_size, config.num_heads) == SIZES[name.split("/")[0]]
    c1, c2 = (dit.count_params(_family_config(family, name, depth=k)) for k in (1, 2))
    ours = c1 + (official["depth"] - 1) * (c2 - c1)
    assert ours == official_count(official_shapes(**official)), (family, name)


def test_headline_counts():
  table = official_shapes(**_official_for("dit", "XL/2"))
  assert len(table) == 292  # DiT models.py state_dict: 292 tensors, summing to the logged count
  assert official_count(table) == 675_129_632  # fast-DiT logs "DiT Parameters: 675,129,632"
  ldit = dit.count_params(dit.lightningdit_config("XL/1"))
  assert ldit == official_count(official_shapes(**_official_for("lightningdit", "XL/1")))
  assert round(ldit / 1e6, 2) == 675.26  # LightningDiT docs/log.txt: "675.26M"
  for name, millions in (("S/2", 33), ("B/2", 130), ("L/2", 458)):  # DiT paper Table 4
    count = official_count(official_shapes(**_official_for("dit", name)))
    assert abs(count / 1e6 - millions) / millions < 0.005


def test_model_arrays_follow_the_official_table():
  """Every LightningDiT array (with QK-norm) has the official count and element layout."""
  config = dit.lightningdit_config("XL/1", depth=2, qk_norm=True)
  model = nnx.eval_shape(lambda: dit.DiT(config, rngs=nnx.Rngs(0)))
  ours = sorted(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
  table = official_shapes(**dict(_official_for("lightningdit", "XL/1"), depth=2), qk_norm=True)
  assert ours == sorted(int(np.prod(s)) for s in table.values())
  block = nnx.to_pure_dict(nnx.state(model))["blocks"][0]
  assert block["mlp"]["w12"]["kernel"].shape == (1152, 6144)  # SwiGLU hidden int(2/3 * 4608)
  assert block["attn"]["q_norm"]["scale"].shape == (72,)


def test_lightningdit_xl1_has_dit_xl2_macs():
  # 256 tokens either way; SwiGLU keeps the MLP's MACs (LightningDiT models/lightningdit.py):
  # ~118.6 GMACs, the DiT paper's "Gflops" for XL/2 (Table 4).
  ldit = dit.forward_flops(dit.lightningdit_config("XL/1")) / 2e9
  assert abs(ldit - dit.forward_flops(dit.dit_config("XL/2")) / 2e9) < 0.01
  assert abs(ldit - 118.6) < 0.05


# ---------------------------------------------------------------------------- model options

TINY = dict(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def _random_model(config, seed=0):
  model = dit.DiT(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32),
                        nnx.to_pure_dict(params))
  return graphdef, params, nnx.to_pure_dict(rest)


def test_remat_gives_the_same_loss_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
  t, y = jnp.array([0.3, 0.9]), jnp.array([1, 5])

  def grads(remat):
    config = dit.lightningdit_config("S/2", remat=remat, qk_norm=True, **TINY)
    graphdef, params, rest = _random_model(config)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(x, t, y) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params), loss(params)

  ((a, ga), eager_a), ((b, gb), eager_b) = grads(False), grads(True)
  # Op by op, remat runs the very same forward; compiled, XLA:CPU may fuse the two graphs
  # differently and reassociate (1 ulp on some CPUs).
  assert eager_a == eager_b
  np.testing.assert_allclose(a, b, rtol=2e-7)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), ga, gb)


def test_t0_noise_wraps_the_official_convention():
  """time_convention='t0_noise' is the same network fed 1 - t, output negated."""
  plain = dit.lightningdit_config("S/2", time_convention="t1_noise", **TINY)
  graphdef, params, rest = _random_model(plain)
  wrapped_graph = nnx.split(dit.DiT(dit.lightningdit_config("S/2", **TINY),
                                    rngs=nnx.Rngs(0)), nnx.Param, ...)[0]
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 4))
  t, y = jnp.array([0.25, 0.8]), jnp.array([0, 3])
  ours = nnx.merge(wrapped_graph, params, rest)(x, t, y)
  np.testing.assert_allclose(ours, -nnx.merge(graphdef, params, rest)(x, 1 - t, y), atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 4))
  t, y = jnp.array([0.3, 0.7]), jnp.array([2, 4])
  out = {}
  for dtype in ("float32", "bfloat16"):
    graphdef, params, rest = _random_model(dit.lightningdit_config("S/2", dtype=dtype, **TINY))
    out[dtype] = np.asarray(nnx.merge(graphdef, params, rest)(x, t, y))
  assert out["bfloat16"].dtype == np.float32  # outputs are returned in float32
  scale = np.abs(out["float32"]).max()
  assert np.abs(out["bfloat16"] - out["float32"]).max() < 0.05 * scale


def test_every_parameter_has_known_logical_axes():
  config = dit.lightningdit_config("S/2", qk_norm=True, **TINY)
  model = nnx.eval_shape(lambda: dit.DiT(config, rngs=nnx.Rngs(0)))
  names = sharding.logical_names(nnx.state(model, nnx.Param))
  known = {name for name, _ in sharding.RULES} | {None}
  for leaf in jax.tree.leaves(names, is_leaf=lambda n: isinstance(n, tuple)):
    assert isinstance(leaf, tuple) and set(leaf) <= known, leaf


# ---------------------------------------------------------------------------- training


def test_tiny_lightningdit_trains_on_digits_through_the_trainer_and_demo(digits_data_dir,
                                                                          tmp_path):
  config = config_lib.load("lightningdit_digits:tiny")
  config.data.data_dir = digits_data_dir
  assert config.objective.cosine_loss and config.model.rope and config.model.mlp == "swiglu"
  workdir = str(tmp_path / "ldit")
  results = demo.run(config, workdir)
  assert sorted(results["euler"], key=int) == [str(n) for n in config.demo.nfe]
  for entry in results["euler"].values():
    assert np.isfinite(entry["fid"]) and 0 <= entry["accuracy"] <= 1
  _, state = task_lib.load_workdir(workdir)
  assert int(state["step"]) == config.num_steps
  with open(f"{workdir}/metrics.jsonl") as f:
    assert '"cosine"' in f.read()  # the velocity-direction loss is logged


@pytest.mark.parametrize("fsdp, tensor, scanned", [(1, 1, True), (2, 1, False), (1, 4, False)])
def test_blocks_run_unrolled_where_the_mesh_shards_parameters(fsdp, tensor, scanned):
  """Every DiT config carries scan_blocks (True); a mesh sharding the parameters unrolls them
  anyway (scanned, FSDP's stacked parameters are replicated: pod_memory's LightningDiT-XL/1 at
  8-way FSDP moved 778,785 MiB a step that way, 7,419 unrolled)."""
  from types import SimpleNamespace
  from tesserax.tasks import diffusion
  config = dit.lightningdit_config("XL/1")
  assert config.scan_blocks
  built = diffusion._for_mesh(config, SimpleNamespace(shape={"fsdp": fsdp, "tensor": tensor}))
  assert built.scan_blocks is scanned
  assert config.scan_blocks  # the run's own config is left as it was
