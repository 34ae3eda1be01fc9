"""Token generators: the MaskGIT networks (TiTok's ImageBert and UViTBert) and the LlamaGen-style
autoregressive transformer against float64 NumPy forwards written from the official layouts
(HF BertModel, modeling/modules/blocks.py UViTBlock, LlamaGen's block) over the official
state-dict keys; the MaskGIT sampler against hand-computed re-mask sequences and the CFG
formulas; the masked-token loss against its formula; KV-cache decoding against full
recomputation; top-k / top-p against NumPy; the token generator task on a synthetic
class-dependent token dataset; one-line refusals."""
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from tesserax.core import config as config_lib, sharding
from tesserax.core.errors import TesseraxError
from tesserax.generators import autoregressive, maskgit
from tesserax.objectives import masked_tokens
from tesserax.objectives.context import Context
from tesserax.sampling import autoregressive_decode, maskgit_decode
from tesserax.tasks import token_generator
from tesserax.training import task as task_lib

C, NUM_CLASSES, N = 6, 3, 5  # codebook, classes, tokens


def _np(x):
  return np.asarray(x, np.float64)


def _random_net(cls, config, seed):
  """The network with N(0, 0.3^2) parameters (norm scales 1 + that): built from shapes, so no
  initializer runs (each would compile on its own), buffers as the network computes them."""
  net = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, leaf in nnx.to_flat_state(nnx.state(net, nnx.Param)):
    value = 0.3 * rng.normal(size=leaf.get_value().shape) + (path[-1] == "scale")
    leaf.set_value(jnp.asarray(value, jnp.float32))
  if isinstance(net, autoregressive.AutoregressiveTransformer):
    cos, sin = autoregressive.rope_1d(config.hidden_size // config.num_heads, config.seq_len)
    net.freqs_cos.set_value(jnp.asarray(cos, jnp.float32))
    net.freqs_sin.set_value(jnp.asarray(sin, jnp.float32))
  return net


def _jitted(net, *args):
  """net(*args) compiled as one program (eager calls compile every op)."""
  graphdef, state = nnx.split(net)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _attention(q, k, v, heads, causal=False):
  """[B, T, D] each -> [B, T, D], heads split as (heads, head_dim) of the last axis."""
  b, t, d = q.shape
  split = lambda x: x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)
  scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  if causal:
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  out = _softmax(scores) @ split(v)
  return out.transpose(0, 2, 1, 3).reshape(b, t, d)


def _lin(sd, name, x):
  y = x @ sd[name + ".weight"].T
  return y + sd[name + ".bias"] if name + ".bias" in sd else y


# --- official state dicts of our parameters, through the converter's key map ----------------

def official_state_dict(net, config):
  """{official key: float64 torch-layout array} of `net` by maskgit.official_keys; every
  parameter is mapped exactly once."""
  ours = {".".join(map(str, path)): _np(leaf.get_value())
          for path, leaf in nnx.to_flat_state(nnx.state(net, nnx.Param))}
  keys = maskgit.official_keys(config)
  assert sorted(keys) == sorted(ours)
  assert len({theirs for theirs, _ in keys.values()}) == len(keys)
  return {theirs: ours[path].T if how == "transpose" else ours[path]
          for path, (theirs, how) in keys.items()}


# --- float64 forwards from the official code's structure ------------------------------------

def bert_reference(sd, ids, labels, layers, heads):
  """ImageBert.forward: [class token, ids] through BertModel, lm_head on positions 1..N."""
  seq = np.concatenate([labels[:, None] + C + 1, ids], axis=1)
  x = (sd["model.embeddings.word_embeddings.weight"][seq]
       + sd["model.embeddings.position_embeddings.weight"][None, :seq.shape[1]]
       + sd["model.embeddings.token_type_embeddings.weight"][0])
  ln = lambda name, x: _ln(x, sd[name + ".weight"], sd[name + ".bias"], 1e-12)
  x = ln("model.embeddings.LayerNorm", x)
  for i in range(layers):
    p = f"model.encoder.layer.{i}."
    q, k, v = (_lin(sd, p + "attention.self." + n, x) for n in ("query", "key", "value"))
    a = _lin(sd, p + "attention.output.dense", _attention(q, k, v, heads))
    x = ln(p + "attention.output.LayerNorm", a + x)
    h = _lin(sd, p + "output.dense", _gelu(_lin(sd, p + "intermediate.dense", x)))
    x = ln(p + "output.LayerNorm", h + x)
  return _lin(sd, "model.lm_head", x[:, 1:])


def uvit_reference(sd, ids, labels, layers, heads):
  """UViTBert.forward with UViTBlock._forward (pre-LN, eps 1e-5, qkv without bias)."""
  seq = np.concatenate([labels[:, None] + C + 1, ids], axis=1)
  x = sd["embeddings.weight"][seq] + sd["pos_embed"][:, :seq.shape[1]]
  ln = lambda name, x: _ln(x, sd[name + ".weight"], sd[name + ".bias"], 1e-5)

  def block(p, x, skip=None):
    if skip is not None:
      x = _lin(sd, p + ".skip_linear", np.concatenate([x, skip], -1))
    q, k, v = np.split(_lin(sd, p + ".attn.qkv", ln(p + ".norm1", x)), 3, axis=-1)
    x = x + _lin(sd, p + ".attn.proj", _attention(q, k, v, heads))
    return x + _lin(sd, p + ".mlp.fc2", _gelu(_lin(sd, p + ".mlp.fc1", ln(p + ".norm2", x))))

  skips = []
  for i in range(layers // 2):
    x = block(f"in_blocks.{i}", x)
    skips.append(x)
  x = block("mid_block", x)
  for i in range(layers // 2):
    x = block(f"out_blocks.{i}", x, skips.pop())
  return _lin(sd, "lm_head", ln("norm", x)[:, 1:])


def _tiny_maskgit(name, **kw):
  return maskgit.maskgit_config(name, codebook_size=C, num_classes=NUM_CLASSES, seq_len=N,
                                hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16,
                                **kw)


@pytest.mark.parametrize("name,reference", [("L-32", bert_reference), ("S-128", uvit_reference)])
def test_maskgit_networks_match_float64_reference(name, reference):
  config = _tiny_maskgit(name)
  model = maskgit.MaskGITBert if config.name == "maskgit_bert" else maskgit.MaskGITUViT
  net = _random_net(model, config, 1)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, C + 1, (3, N))  # [MASK] = C included
  labels = np.array([0, 2, NUM_CLASSES])  # null class included
  ours = _jitted(net, jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32))
  ref = reference(official_state_dict(net, config), ids, labels, 2, 2)
  assert ours.shape == (3, N, C)
  np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=1e-4, atol=1e-4)
  if config.dropout:  # ImageBert's hidden dropout acts in training only
    graphdef, state = nnx.split(net)
    train = lambda s, *a: nnx.merge(graphdef, s)(*a, train=True, key=jax.random.PRNGKey(0))
    dropped = jax.jit(train)(state, jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32))
    assert np.abs(np.asarray(dropped) - np.asarray(ours)).max() > 1e-3


def test_released_generator_parameter_counts():
  """Counted from the official structure at the released widths and vocabulary (two layers, so
  that building stays cheap; a layer's count does not depend on the depth): HF BertModel
  (type_vocab_size 2, no pooler) + lm_head for L-32 / B-64; UViTBert's table, pos_embed, in /
  mid / out blocks, one skip Linear per out-block, norm, lm_head. At full depth the same
  formulas give L-32 177,202,432, B-64 177,227,008 and S-128 294,990,848."""
  d, f, vocab = 768, 3072, 4096 + 1000 + 2
  layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
  expected = vocab * d + 33 * d + 2 * d + 2 * d + 2 * layer + d * 4096 + 4096
  assert maskgit.count_params(maskgit.maskgit_config("L-32", num_layers=2)) == expected
  d, f = 1024, 4096
  block = 2 * 2 * d + 3 * d * d + (d * d + d) + (d * f + f) + (f * d + d)
  expected = vocab * d + 129 * d + 3 * block + (2 * d * d + d) + 2 * d + d * 4096 + 4096
  assert maskgit.count_params(maskgit.maskgit_config("S-128", num_layers=2)) == expected


# --- autoregressive network -----------------------------------------------------------------

def _tiny_ar(**kw):
  return autoregressive.ar_config(codebook_size=C, num_classes=NUM_CLASSES, seq_len=N,
                                  hidden_size=8, depth=2, num_heads=2, mlp_hidden=12, **kw)


@pytest.fixture(scope="session")
def ar_net():
  return _random_net(autoregressive.AutoregressiveTransformer, _tiny_ar(), 2)


def test_autoregressive_matches_float64_reference(ar_net):
  net = ar_net
  rng = np.random.default_rng(1)
  ids, labels = rng.integers(0, C, (2, N)), np.array([1, NUM_CLASSES])
  p = lambda m: _np(m[...])
  rms = lambda x, w: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w
  x = np.concatenate([p(net.cls_embedding.embedding)[labels][:, None],
                      p(net.tok_embeddings.embedding)[ids[:, :-1]]], 1)
  hd = 4
  angles = np.arange(N)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)[None]  # [N, hd/2]

  def rope(t):  # pairs (2j, 2j+1) as complex numbers times e^{i angle}
    b, n, d = t.shape
    z = t.reshape(b, n, 2, hd // 2, 2)
    z = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * angles)[None, :, None]
    return np.stack([z.real, z.imag], -1).reshape(b, n, d)

  lin = lambda m, x: x @ p(m.kernel) + p(m.bias)
  for blk in net.layers:
    h = rms(x, p(blk.attention_norm.scale))
    q, k, v = np.split(lin(blk.attention.qkv, h), 3, axis=-1)
    x = x + lin(blk.attention.proj, _attention(rope(q), rope(k), v, 2, causal=True))
    h = rms(x, p(blk.ffn_norm.scale))
    a, g = np.split(lin(blk.feed_forward.w12, h), 2, axis=-1)
    x = x + lin(blk.feed_forward.w3, a / (1 + np.exp(-a)) * g)
  ref = lin(net.output, rms(x, p(net.norm.scale)))
  ours = _jitted(net, jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32))
  np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=1e-4, atol=1e-4)


def test_kv_cache_decoding_equals_full_recomputation(ar_net):
  """With guidance: both halves of the doubled batch go through the cache."""
  cfg_scale = 2.5
  graphdef, state = nnx.split(ar_net)
  model = autoregressive_decode.CachedModel(
      logits=lambda s, t, y: nnx.merge(graphdef, s)(t, y),
      init_cache=ar_net.init_cache,
      step=lambda s, prev, y, cache, pos: nnx.merge(graphdef, s).decode(prev, y, cache, pos))
  labels, key = jnp.array([0, 2, 1], jnp.int32), jax.random.PRNGKey(3)
  run = lambda kv: jax.jit(lambda s: autoregressive_decode.decode(
      model, s, labels, key, seq_len=N, null_label=NUM_CLASSES, temperature=1.5,
      cfg_scale=cfg_scale, kv_cache=kv))(state)
  (ids_kv, logits_kv), (ids_full, logits_full) = run(True), run(False)
  np.testing.assert_array_equal(ids_kv, ids_full)
  np.testing.assert_allclose(logits_kv, logits_full, rtol=1e-5, atol=1e-5)
  both = jax.jit(model.logits)(state, jnp.concatenate([ids_kv, ids_kv]),
                              jnp.concatenate([labels, jnp.full_like(labels, NUM_CLASSES)]))
  teacher, uncond = both[:3], both[3:]  # every position at once, teacher-forced
  expected = uncond + cfg_scale * (teacher - uncond)
  np.testing.assert_allclose(logits_kv, expected, rtol=1e-5, atol=1e-5)
  assert len(np.unique(np.asarray(ids_kv))) > 1


def _np_filter(logits, top_k, top_p):
  out = logits.copy()
  for row in out.reshape(-1, out.shape[-1]):
    if top_k:
      row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
    if top_p < 1:
      order = np.argsort(-row, kind="stable")
      probs = np.exp(row[order] - row[order][0])
      probs /= probs.sum()
      mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
      row[order[mass_before >= top_p]] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (4, 0.8), (1, 1.0), (0, 1.0)])
def test_top_k_top_p_filter_matches_numpy(top_k, top_p):
  logits = np.random.default_rng(4).normal(size=(4, 9)) * 2
  ours = autoregressive_decode.filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p)
  ref = _np_filter(logits.astype(np.float32).astype(np.float64), top_k, top_p)
  np.testing.assert_array_equal(np.isinf(np.asarray(ours)), np.isinf(ref))
  kept = ~np.isinf(ref)
  np.testing.assert_allclose(np.asarray(ours)[kept], ref[kept], rtol=1e-6)


# --- MaskGIT sampler ------------------------------------------------------------------------

def _fixed_table(values):
  """A predict ignoring its inputs: logits `values` [N, C] for every example."""
  return lambda params, tokens, labels: jnp.broadcast_to(
      jnp.asarray(values, jnp.float32), tokens.shape + (values.shape[-1],))


def _run_maskgit(predict, labels, *, seq_len, steps, temperature=0.0, guidance="constant",
                 scale=0.0, annealing=True, key=0):
  tables = maskgit_decode.schedule(seq_len, steps, randomize_temperature=temperature,
                                   softmax_temperature_annealing=annealing, guidance=guidance,
                                   guidance_scale=scale)
  return jax.jit(lambda y, k: maskgit_decode.decode(
      predict, None, y, k, seq_len=seq_len, mask_id=C, null_label=NUM_CLASSES, tables=tables,
      guidance=guidance))(jnp.asarray(labels, jnp.int32), jax.random.PRNGKey(key))


# N = 8, S = 4: floor(8 arccos(r) / (pi/2)) for r = 1/4, 2/4, 3/4 is floor(6.71) = 6,
# floor(5.33) = 5, floor(3.68) = 3, each within [1, #masked - 1]; the last step fixes all.
# N = 3, S = 8: r = 1/8 gives floor(2.76) = 2; r = 2/8 floor(2.52) = 2 clamped to #masked - 1 = 1;
# from then on min(#masked - 1 = 0, .) is clamped up to 1, so one token stays masked until the
# last step.
@pytest.mark.parametrize("seq_len,steps,masked_after", [
    (8, 4, [6, 5, 3, 0]), (3, 8, [2, 1, 1, 1, 1, 1, 1, 0])])
def test_maskgit_fixes_tokens_in_confidence_order(seq_len, steps, masked_after):
  rng = np.random.default_rng(5)
  table = rng.normal(size=(seq_len, C))
  ids, history = _run_maskgit(_fixed_table(table), [0, 1], seq_len=seq_len, steps=steps)
  history = np.asarray(history)
  np.testing.assert_array_equal((history == C).sum(-1), np.array([masked_after] * 2).T)
  best = table.argmax(-1)
  order = np.argsort(-table.max(-1))  # most confident first: the chosen logit, not its prob.
  for s, masked in enumerate(masked_after):
    fixed = np.sort(order[:seq_len - masked])
    for row in history[s]:
      np.testing.assert_array_equal(np.flatnonzero(row != C), fixed)
      np.testing.assert_array_equal(row[fixed], best[fixed])
  np.testing.assert_array_equal(np.asarray(ids), np.broadcast_to(best, (2, seq_len)))


def test_maskgit_confidence_is_the_logit_not_the_probability():
  """Position 0 has the larger top logit but the flatter distribution (lower top probability);
  MaskGIT's confidence, the logit, fixes it first."""
  table = np.array([[5.0, 4.9, 4.9, 4.9, 4.9, 4.9], [3.0, -9, -9, -9, -9, -9],
                    [1.0, 0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0, 0]])
  assert _softmax(table[0]).max() < _softmax(table[1]).max()
  _, history = _run_maskgit(_fixed_table(table), [0], seq_len=4, steps=4)
  first = np.flatnonzero(np.asarray(history)[0, 0] != C)  # floor(4 * 0.839) = 3 left masked
  np.testing.assert_array_equal(first, [0])


def test_maskgit_guidance_tables_match_their_formulas():
  s, g = np.arange(8), 4.5
  const = maskgit_decode.schedule(32, 8, randomize_temperature=9.5, guidance="constant",
                                  guidance_scale=g)
  linear = maskgit_decode.schedule(32, 8, randomize_temperature=9.5, guidance="linear",
                                   guidance_scale=g)
  cosine = maskgit_decode.schedule(128, 8, randomize_temperature=2.8, guidance="power-cosine",
                                   guidance_scale=6.9, guidance_scale_pow=3.0)
  np.testing.assert_allclose(const.guidance, np.full(8, g))
  np.testing.assert_allclose(linear.guidance, [0, g / 8, 2 * g / 8, 3 * g / 8, 4 * g / 8,
                                               5 * g / 8, 6 * g / 8, 7 * g / 8])
  np.testing.assert_allclose(cosine.guidance,
                             [(6.9 - 1) * (1 - math.cos(math.pi * (i / 8) ** 3)) / 2 + 1
                              for i in s])
  np.testing.assert_allclose(linear.temperature, [9.5 * (1 - (i + 1) / 8) for i in s])
  np.testing.assert_allclose(linear.logit_divisor, [0.5 + 0.8 * (1 - (i + 1) / 8) for i in s])
  assert linear.temperature[-1] == 0


@pytest.mark.parametrize("guidance,scale", [("constant", 1.5), ("linear", 6.0),
                                            ("power-cosine", 6.9)])
def test_maskgit_cfg_conventions(guidance, scale):
  """Tokens fixed at step s are the argmax of that step's guided logits: cond + w (cond -
  uncond) for constant/linear, uncond + w (cond - uncond) for power-cosine, w from the table."""
  rng = np.random.default_rng(6)
  seq_len, steps = 16, 4
  cond, uncond = rng.normal(size=(seq_len, C)), rng.normal(size=(seq_len, C))
  predict = lambda params, tokens, labels: jnp.where(
      (labels == NUM_CLASSES)[:, None, None], jnp.asarray(uncond, jnp.float32),
      jnp.asarray(cond, jnp.float32))
  _, history = _run_maskgit(predict, [1], seq_len=seq_len, steps=steps, guidance=guidance,
                            scale=scale)
  history = np.asarray(history)[:, 0]
  weights = maskgit_decode.schedule(seq_len, steps, randomize_temperature=0, guidance=guidance,
                                    guidance_scale=scale).guidance
  before, other_convention_differs = np.ones(seq_len, bool), False
  for s in range(steps):
    if guidance == "power-cosine":
      logits, other = uncond + weights[s] * (cond - uncond), cond + weights[s] * (cond - uncond)
    else:
      logits, other = cond + weights[s] * (cond - uncond), uncond + weights[s] * (cond - uncond)
    new = before & (history[s] != C)
    np.testing.assert_array_equal(history[s][new], logits.argmax(-1)[new])
    other_convention_differs |= np.any(other.argmax(-1)[new] != logits.argmax(-1)[new])
    before = history[s] == C
  assert other_convention_differs


def test_maskgit_last_step_leaves_no_mask_with_noise():
  rng = np.random.default_rng(7)
  cond, uncond = rng.normal(size=(N, C)) * 3, rng.normal(size=(N, C)) * 3
  predict = lambda params, tokens, labels: jnp.where(
      (labels == NUM_CLASSES)[:, None, None], jnp.asarray(uncond, jnp.float32),
      jnp.asarray(cond, jnp.float32))
  settings = ml_collections.ConfigDict(dict(num_steps=3, randomize_temperature=4.5,
                                            guidance="linear", guidance_scale=3.0))
  sample = maskgit_decode.make(predict, settings, seq_len=N, codebook_size=C,
                               null_label=NUM_CLASSES)
  ids = np.asarray(sample(None, jnp.zeros(64, jnp.int32), jax.random.PRNGKey(7)))
  assert ids.shape == (64, N) and ids.min() >= 0 and ids.max() < C
  assert len({tuple(row) for row in ids}) > 1  # the Gumbel noise varies the samples


# --- masked-token objective -----------------------------------------------------------------

def test_masked_token_loss_matches_formula():
  rng = np.random.default_rng(8)
  b, n = 64, 8
  tokens = rng.integers(0, C, (b, n)).astype(np.int32)
  logits = rng.normal(size=(b, n, C)).astype(np.float32)
  seen = {}

  def apply(params, x, labels, train=False, key=None):
    seen.update(x=x, labels=labels, train=train)
    return jnp.asarray(logits)

  config = ml_collections.ConfigDict(dict(
      objective=dict(name="masked_tokens", label_smoothing=0.1, unmasked_weight=0.1),
      model=dict(codebook_size=C, class_dropout=1.0)))
  objective = masked_tokens.make(config)
  ctx = Context(step=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(9), num_classes=NUM_CLASSES)

  def run(batch):
    value, metrics = objective.loss(apply, None, batch, ctx)
    return value, metrics, seen["x"], seen["labels"]

  value, metrics, x, dropped = jax.jit(run)({"image": jnp.asarray(tokens),
                                             "label": jnp.zeros(b, jnp.int32)})
  x, dropped = np.asarray(x), np.asarray(dropped)
  mask = x == C
  np.testing.assert_array_equal(x[~mask], tokens[~mask])
  np.testing.assert_array_equal(dropped, NUM_CLASSES)  # class dropout 1: all null
  assert seen["train"] and mask.sum(1).min() >= 1 and mask.sum(1).max() <= n
  # arccos schedule: t ~ U(0, 1), round(n arccos(t) / (pi/2)) tokens, at least one.
  t = np.asarray(jax.random.uniform(jax.random.split(jax.random.split(ctx.key, 3)[0])[0], (b,)),
                 np.float64)
  np.testing.assert_array_equal(mask.sum(1), np.maximum(np.round(
      n * np.clip(np.arccos(t) / (np.pi / 2), 1e-6, 1)), 1))
  logp = np.log(_softmax(logits.astype(np.float64)))
  ce = (-0.9 * np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
        - 0.1 / C * logp.sum(-1))
  w = np.where(mask, 1.0, 0.1)
  np.testing.assert_allclose(float(value), (ce * w).sum() / (w.sum() + 1e-8), rtol=1e-5)
  correct = (logits.argmax(-1) == tokens) & mask
  np.testing.assert_allclose(float(metrics["masked_accuracy"]),
                             np.mean(correct.sum(1) / mask.sum(1)), rtol=1e-5)


# --- refusals --------------------------------------------------------------------------------

def test_refusals_in_one_line(tmp_path):
  net = _random_net(maskgit.MaskGITUViT, _tiny_maskgit("S-128"), 0)
  with pytest.raises(TesseraxError,
                     match=r"token ids in \[7, 7\]; this generator takes ids in \[0, 7\)") as err:
    net(jnp.full((1, N), C + 1, jnp.int32), jnp.zeros(1, jnp.int32))
  assert "\n" not in str(err.value)
  ar = _random_net(autoregressive.AutoregressiveTransformer, _tiny_ar(), 0)
  with pytest.raises(TesseraxError, match="token ids"):
    ar(jnp.full((1, N), C, jnp.int32), jnp.zeros(1, jnp.int32))  # [MASK] is no AR token
  model = _tiny_maskgit("L-32")
  tokenizer = types.SimpleNamespace(is_discrete=True, codebook_size=4096, latent_shape=(1, N, 1))
  with pytest.raises(TesseraxError, match=f"codebook of 4096; this generator models {C}") as err:
    token_generator.check_pairing(tokenizer, model)
  assert "\n" not in str(err.value)
  tokenizer.codebook_size, tokenizer.latent_shape = C, (1, 2 * N, 1)
  with pytest.raises(TesseraxError, match=f"gives {2 * N} tokens"):
    token_generator.check_pairing(tokenizer, model)
  tokenizer.latent_shape = (1, N, 1)
  token_generator.check_pairing(tokenizer, model)
  tokenizer.is_discrete = False
  with pytest.raises(TesseraxError, match="continuous"):
    token_generator.check_pairing(tokenizer, model)
  config = config_lib.load("digits_maskgit:tiny")
  (tmp_path / "cache.json").write_text('{"latent_shape": [1, 8, 1], "tokenizer": {"dir": "t"}}')
  config.data.data_dir = str(tmp_path)
  with pytest.raises(TesseraxError, match="holds 8 tokens per image; this generator models 16"):
    token_generator.token_source(config)
  config = config_lib.load("digits_ar:tiny")
  config.objective.name = "masked_tokens"
  with pytest.raises(TesseraxError, match="model autoregressive is trained with objective "
                     "next_token, not masked_tokens"):
    task_lib.build(config, sharding.make_mesh(config.mesh))


# --- the task on synthetic class-dependent tokens --------------------------------------------

def _synthetic_tokens(labels, seq_len, codebook):
  """Each class one fixed token sequence."""
  return ((labels[:, None] * 5 + 3 * np.arange(seq_len)[None]) % codebook).astype(np.int32)


@pytest.mark.parametrize("recipe,steps", [("digits_maskgit:tiny", 300), ("digits_ar:tiny", 150)])
def test_task_learns_class_dependent_tokens(recipe, steps):
  """Trained on one fixed token sequence per class, the recipe's own sampler (MaskGIT: 4 steps,
  Gumbel temperature 1, linear guidance 2; AR: KV cache, temperature 1, guidance 2) gives the
  requested class's tokens."""
  config = config_lib.load(recipe)
  config.data.name = "synthetic"  # batches are fed by hand below
  config.model.update(codebook_size=16, seq_len=6, class_dropout=0.1)
  config.num_steps, config.batch_size = steps, 32
  config.optim.update(lr=3e-3, warmup_steps=0, schedule="constant")
  config.ema_decay = 0.0
  task = task_lib.build(config, sharding.make_mesh(config.mesh))
  state = task.init()
  rng = np.random.default_rng(10)
  for _ in range(config.num_steps):
    labels = rng.integers(0, 10, config.batch_size).astype(np.int32)
    batch = {"image": _synthetic_tokens(labels, 6, 16), "label": labels}
    state, metrics = task.train_step(state, sharding.global_batch(batch, task.mesh))
  labels = np.arange(10, dtype=np.int32)
  ids = task.predict["generate"](state["ema"], labels, jax.random.PRNGKey(0))
  assert ids.shape == (10, 6) and ids.dtype == np.int32
  accuracy = np.mean(ids == _synthetic_tokens(labels, 6, 16))
  assert accuracy >= 0.9, (accuracy, float(metrics["loss"]))
