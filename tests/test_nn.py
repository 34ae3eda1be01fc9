"""nn/: the shared attention against a float64 NumPy reference (masks, causal, QK-norm, RoPE),
fused vs separate qkv, KV-cache decoding vs full causal attention, and the shared layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tesserax.nn import attention, layers

B, T, H, D = 2, 6, 2, 8  # batch, tokens, heads, head_dim


def np_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(D)) v in float64, [B, T, H, D] layout; mask [B|1, H|1, Tq, Tk]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def np_rms_norm(x, scale):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale


def np_rope(x, cos, sin):
  """Interleaved pairs as complex numbers x1 + i x2, rotated by the angle of each pair."""
  z = x[..., 0::2] + 1j * x[..., 1::2]
  z = z * (cos[:, None, 0::2] + 1j * sin[:, None, 0::2])
  return np.stack([z.real, z.imag], -1).reshape(x.shape)


def qkv(seed, tq=T, tk=T):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((B, tq, H, D)).astype(np.float32),
          rng.standard_normal((B, tk, H, D)).astype(np.float32),
          rng.standard_normal((B, tk, H, D)).astype(np.float32))


IMPLEMENTATIONS = [None, "einsum"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dot_product_attention_matches_numpy(implementation):
  q, k, v = qkv(0, tq=5, tk=7)
  got = attention.dot_product_attention(q, k, v, implementation=implementation)
  np.testing.assert_allclose(got, np_attention(q, k, v), atol=2e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_boolean_mask_and_causal(implementation):
  q, k, v = qkv(1, tq=5, tk=7)
  mask = np.random.default_rng(2).uniform(size=(B, 1, 5, 7)) < 0.6
  mask[..., 0] = True  # every query attends somewhere
  got = attention.dot_product_attention(q, k, v, jnp.asarray(mask), implementation=implementation)
  np.testing.assert_allclose(got, np_attention(q, k, v, mask), atol=2e-6)
  q, k, v = qkv(3)
  causal = np.tril(np.ones((T, T), bool))[None, None]
  got = attention.dot_product_attention(q, k, v, causal=True, implementation=implementation)
  np.testing.assert_allclose(got, np_attention(q, k, v, causal), atol=2e-6)
  mask = np.random.default_rng(4).uniform(size=(B, H, T, T)) < 0.6
  mask[..., 0] = True
  got = attention.dot_product_attention(q, k, v, jnp.asarray(mask), causal=True,
                                        implementation=implementation)
  np.testing.assert_allclose(got, np_attention(q, k, v, causal & mask), atol=2e-6)


def test_einsum_single_head_is_the_ldm_computation_bit_for_bit():
  """The KL autoencoder's AttnBlock relies on this: one head through the "einsum"
  implementation is exactly softmax(einsum(q, k) * c^-0.5) @ v, forward and backward."""
  rng = np.random.default_rng(4)
  q, k, v, g = (jnp.asarray(rng.standard_normal((3, 16, 32)), jnp.float32) for _ in range(4))

  def ldm(q, k, v):
    w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * 32 ** -0.5, axis=-1)
    return jnp.einsum("bqk,bkc->bqc", w, v)

  def ours(q, k, v):
    out = attention.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                          implementation="einsum")
    return out[:, :, 0]

  for f in (lambda fn: fn, lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * g), (0, 1, 2))):
    want, got = jax.jit(f(ldm))(q, k, v), jax.jit(f(ours))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), want, got)


def test_precision_reaches_both_products():
  q, k, v = qkv(5)
  for implementation in IMPLEMENTATIONS:
    fn = lambda q, k, v: attention.dot_product_attention(
        q, k, v, precision=jax.lax.Precision.HIGHEST, implementation=implementation)
    dots = [l for l in jax.jit(fn).lower(q, k, v).as_text().splitlines() if "dot_general" in l]
    assert len(dots) == 2 and all("HIGHEST" in l for l in dots), implementation


def _module(fused, qk_norm=False, seed=0):
  return attention.Attention(H * D, H, fused_qkv=fused, qk_norm=qk_norm, rngs=nnx.Rngs(seed))


def test_parameter_names_and_logical_axes():
  fused = nnx.to_pure_dict(nnx.state(_module(True, qk_norm=True), nnx.Param))
  assert sorted(fused) == ["k_norm", "proj", "q_norm", "qkv"]
  assert fused["qkv"]["kernel"].shape == (H * D, 3 * H * D)
  assert fused["q_norm"]["scale"].shape == (D,)
  assert sorted(nnx.to_pure_dict(nnx.state(_module(False), nnx.Param))) == ["k", "proj", "q", "v"]
  model = _module(True)
  assert model.qkv.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
  assert model.proj.kernel.get_metadata()["out_sharding"] == ("heads", "embed")
  plain = attention.Attention(H * D, H, logical_axes=False, rngs=nnx.Rngs(0))
  assert plain.qkv.kernel.get_metadata().get("out_sharding") is None


def _copy_fused_into_separate(fused, separate):
  """The fused kernel's output columns are [q | k | v] (timm / DiT)."""
  dim = H * D
  for i, name in enumerate("qkv"):
    part = getattr(separate, name)
    part.kernel[...] = fused.qkv.kernel[...][:, i * dim:(i + 1) * dim]
    part.bias[...] = jax.random.normal(jax.random.PRNGKey(i), (dim,))
    fused.qkv.bias[...] = fused.qkv.bias[...].at[i * dim:(i + 1) * dim].set(part.bias[...])
  separate.proj.kernel[...] = fused.proj.kernel[...]


def test_fused_qkv_equals_separate_projections_with_the_same_weights():
  fused, separate = _module(True), _module(False, seed=1)
  _copy_fused_into_separate(fused, separate)
  x = jax.random.normal(jax.random.PRNGKey(9), (B, T, H * D))
  np.testing.assert_allclose(fused(x, causal=True), separate(x, causal=True), atol=1e-6)


def test_qk_norm_and_rope_against_numpy():
  model = _module(True, qk_norm=True)
  model.q_norm.scale[...] = jnp.linspace(0.5, 1.5, D)
  model.k_norm.scale[...] = jnp.linspace(1.5, 0.5, D)
  cos, sin = layers.rope_tables(D, 2)  # a 2x2 grid: 4 tokens
  x = jax.random.normal(jax.random.PRNGKey(3), (B, 4, H * D))
  got = model(x, rope=(jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)))
  w = lambda lin: (np.asarray(lin.kernel[...], np.float64), np.asarray(lin.bias[...], np.float64))
  kernel, bias = w(model.qkv)
  qkv_ = (np.asarray(x, np.float64) @ kernel + bias).reshape(B, 4, 3, H, D)
  q = np_rope(np_rms_norm(qkv_[:, :, 0], np.asarray(model.q_norm.scale[...])), cos, sin)
  k = np_rope(np_rms_norm(qkv_[:, :, 1], np.asarray(model.k_norm.scale[...])), cos, sin)
  kernel, bias = w(model.proj)
  want = np_attention(q, k, qkv_[:, :, 2]).reshape(B, 4, H * D) @ kernel + bias
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kv_cache_decoding_equals_full_causal_attention(implementation):
  model = attention.Attention(H * D, H, qk_norm=True, implementation=implementation,
                              rngs=nnx.Rngs(0))
  cos, sin = (jnp.asarray(a, jnp.float32) for a in layers.rope_tables(D, 3))  # 9 positions
  x = jax.random.normal(jax.random.PRNGKey(1), (B, 9, H * D))
  full = model(x, rope=(cos, sin), causal=True)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(cache, xs, position, cos, sin):
    return nnx.merge(graphdef, state).decode(xs, cache, position, rope=(cos, sin))

  cache = model.init_cache(B, 12)  # longer than needed: unwritten slots are masked out
  out, cache = step(cache, x[:, :3], 0, cos[:3], sin[:3])  # prefill a 3-token prompt
  outs = [out]
  for i in range(3, 9):
    out, cache = step(cache, x[:, i:i + 1], i, cos[i:i + 1], sin[i:i + 1])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-6)
  k_full = model.qkv_heads(x, (cos, sin))[1]
  np.testing.assert_allclose(cache.key[:, :9], k_full, atol=1e-6)
  assert not np.any(cache.key[:, 9:])


def test_layers_against_numpy():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 3, 16)).astype(np.float32)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  np.testing.assert_allclose(layers.layer_norm(x), (x - mu) / np.sqrt(var + 1e-6), atol=1e-5)
  norm = layers.RMSNorm(16, "embed")
  assert norm.scale.get_metadata()["out_sharding"] == ("embed",)
  np.testing.assert_allclose(norm(x), np_rms_norm(x, 1.0), atol=1e-5)
  shift, scale = rng.standard_normal((2, 2, 16))
  np.testing.assert_allclose(layers.modulate(x, shift, scale),
                             x * (1 + scale[:, None]) + shift[:, None], atol=1e-6)
  t = np.array([0.0, 3.5, 999.0])
  args = t[:, None] * np.exp(-np.log(10000) * np.arange(128) / 128)
  np.testing.assert_allclose(layers.timestep_embedding(jnp.asarray(t, jnp.float32)),
                             np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-4)
  table = layers.label_embedding(10, 8, rngs=nnx.Rngs(0))
  assert table.embedding.shape == (11, 8)  # the null class is row 10


def test_attention_derivatives_against_finite_differences():
  """The hand-written JVP of unmasked attention (its VJP is the transpose) in float64: equal to
  central differences of the forward pass (whose softmax runs in float32, hence the
  tolerance), and <vjp(c), t> = <c, jvp(t)>."""
  rng = np.random.default_rng(8)
  primals, tangents = ([rng.standard_normal((B, T, H, D)) for _ in range(3)] for _ in range(2))
  with jax.enable_x64(True):
    f = lambda q, k, v: attention.dot_product_attention(q, k, v)  # noqa: E731
    out, jvp = jax.jvp(f, [jnp.asarray(p) for p in primals], [jnp.asarray(t) for t in tangents])
    np.testing.assert_allclose(out, np_attention(*primals), rtol=1e-5, atol=1e-6)
    eps = 1e-3
    shifted = lambda sign: np.asarray(f(*(jnp.asarray(p + sign * eps * t)  # noqa: E731
                                          for p, t in zip(primals, tangents))))
    np.testing.assert_allclose(jvp, (shifted(1) - shifted(-1)) / (2 * eps), rtol=1e-4,
                               atol=2e-4)
    cotangent = rng.standard_normal(out.shape)
    back = jax.vjp(f, *(jnp.asarray(p) for p in primals))[1](jnp.asarray(cotangent))
    np.testing.assert_allclose(sum(np.vdot(b, t) for b, t in zip(back, tangents)),
                               np.vdot(cotangent, jvp), rtol=1e-10)


def test_linear_and_gelu_gradients_against_numpy():
  """The hand-written backward passes of `dense` (every Linear) and `gelu_tanh` (DiT's MLP)
  against float64 NumPy: dx = dy W^T, dW = x^T dy over all leading axes, and the derivative
  of 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
  rng = np.random.default_rng(7)
  x, w, dy = rng.standard_normal((2, 5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(
      (2, 5, 3))
  with jax.enable_x64(True):
    out, vjp = jax.vjp(layers.dense, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(out, x @ w, rtol=1e-12)
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-12)
    np.testing.assert_allclose(dw, np.einsum("bti,btj->ij", x, dy), rtol=1e-12)
    z = np.linspace(-6, 6, 101)
    c = np.sqrt(2 / np.pi)
    # tanh by XLA: for large negative z, 1 + u and 1 - u^2 cancel (six of sixteen digits), and
    # NumPy's tanh may differ from XLA's in the last bits there.
    u = np.asarray(jnp.tanh(jnp.asarray(c * (z + 0.044715 * z ** 3))))
    slope = 0.5 * (1 + u) + 0.5 * z * (1 - u ** 2) * c * (1 + 3 * 0.044715 * z ** 2)
    np.testing.assert_allclose(layers.gelu_tanh(jnp.asarray(z)), 0.5 * z * (1 + u), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(jax.grad(lambda z: jnp.sum(layers.gelu_tanh(z)))(jnp.asarray(z)),
                               slope, rtol=1e-12, atol=1e-14)
  linear = layers.linear(4, 3, ("embed", "mlp"), rngs=nnx.Rngs(0))
  assert linear.dot_general is layers.dense_dot_general
  np.testing.assert_allclose(linear(x.astype(np.float32)), x @ np.asarray(linear.kernel[...])
                             + np.asarray(linear.bias[...]), rtol=1e-5, atol=1e-6)


def test_rope_is_a_rotation_of_each_pair():
  cos, sin = layers.rope_tables(8, 3)
  x = np.random.default_rng(7).standard_normal((1, 9, 2, 8)).astype(np.float32)
  got = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(cos, jnp.float32),
                                     jnp.asarray(sin, jnp.float32)))
  np.testing.assert_allclose(got, np_rope(x, cos, sin), atol=1e-6)
  pair_norm = lambda a: np.hypot(a[..., 0::2], a[..., 1::2])
  np.testing.assert_allclose(pair_norm(got), pair_norm(x), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unmasked_attention_gives_jax_nn_values_bit_for_bit(dtype):
  """The head-major computation of unmasked attention (nn/attention.py `_softmax_attention`)
  against `jax.nn.dot_product_attention` on the same inputs, jitted both: the same bits with
  jax 0.10, which the recorded figures were computed with. jax 0.11's float32 products round
  differently (up to 1.5 ulp of the largest output here; bfloat16 still the same bits), so
  there the check is to 2 ulp of the output's scale."""
  rng = np.random.default_rng(9)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 3, 8)), dtype) for _ in range(3))
  ours = jax.jit(attention.dot_product_attention)(q, k, v)
  theirs = jax.jit(jax.nn.dot_product_attention)(q, k, v)
  assert ours.dtype == theirs.dtype == dtype
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  if jax.__version_info__ < (0, 11):
    np.testing.assert_array_equal(ours, theirs)
  else:
    np.testing.assert_allclose(ours, theirs, rtol=0,
                               atol=2 * float(jnp.finfo(dtype).eps) * np.abs(theirs).max())
