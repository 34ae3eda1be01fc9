"""MaskGIT generators over 1D token ids: TiTok's two networks (bytedance/1d-tokenizer,
modeling/maskgit.py).

Vocabulary (ImageBert.forward): ids [0, codebook) are image tokens, `codebook` is [MASK], class
c is `codebook + 1 + c`, and the null (unconditional) class `codebook + 1 + num_classes`:
codebook + num_classes + 2 rows (5,098 for TiTok's 4,096 codes and 1,000 classes). The
sequence is [class token, N image tokens]; the logits over the codebook are those of positions
1..N. Labels come in tesserax's convention (null = num_classes) and map onto the class tokens.

- `maskgit_bert` (ImageBert, TiTok L-32 and B-64): HF `transformers.BertModel` without pooler:
  word + absolute position + token-type embeddings (row 0 of the type table is added to every
  token: `token_type_ids` default to 0), LayerNorm (eps 1e-12), hidden dropout; post-LN layers
  x = LN(x + drop(dense(attn(x)))), x = LN(x + drop(dense(gelu(dense(x))))) with exact GELU,
  separate query/key/value Linears with biases; `lm_head` Linear(hidden, codebook). Weights
  N(0, 0.02), biases 0 (BertPreTrainedModel._init_weights; `post_init` also covers lm_head).
  BERT's attention-probability dropout (0.1 in the official configs) is not reproduced: the
  shared attention has no dropout on its weights; the hidden dropout is.
- `maskgit_uvit` (UViTBert, TiTok S-128): an embedding table, a learned `pos_embed`
  [1, N+1, hidden], num_layers // 2 in-blocks, one mid-block and num_layers // 2 out-blocks
  (21 blocks for "20 layers"), each out-block first mixing in the matching in-block's output
  with `skip_linear` Linear(2 hidden, hidden) on concat([x, skip]); pre-LN blocks
  (modeling/modules/blocks.py UViTBlock: LayerNorm eps 1e-5, fused qkv without bias, proj with
  bias, Mlp with exact GELU), final LayerNorm, lm_head. No dropout: the official config's 0.1
  is never passed to the blocks. Linears and tables trunc-normal(0.02), biases 0.

Each parameter's docstring line in the classes below names its key in the official state
dict; Linear kernels are the transposed torch weights (in, out), embeddings as stored.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.nn import layers
from tesserax.nn.attention import Attention

# TiTok's released generators (configs/infer/TiTok/titok_{l32,b64,s128}.yaml).
MASKGIT_CONFIGS = {
    "L-32": dict(name="maskgit_bert", seq_len=32, hidden_size=768, num_layers=24, num_heads=16,
                 intermediate_size=3072, dropout=0.1),
    "B-64": dict(name="maskgit_bert", seq_len=64, hidden_size=768, num_layers=24, num_heads=16,
                 intermediate_size=3072, dropout=0.1),
    "S-128": dict(name="maskgit_uvit", seq_len=128, hidden_size=1024, num_layers=20,
                  num_heads=16, intermediate_size=4096, dropout=0.0),
}


def maskgit_config(name: str = "L-32", **overrides) -> ml_collections.ConfigDict:
  """Model config of a released TiTok generator ("L-32", "B-64", "S-128"): 4,096 codes, 1,000
  classes, class dropout 0.1 (maskgit.yaml `class_label_dropout`)."""
  if name not in MASKGIT_CONFIGS:
    raise TesseraxError(f"unknown MaskGIT generator {name!r}; known: {', '.join(MASKGIT_CONFIGS)}")
  config = ml_collections.ConfigDict(dict(
      codebook_size=4096, num_classes=1000, class_dropout=0.1, dtype="float32",
      **MASKGIT_CONFIGS[name]))
  config.update(overrides)
  return config


def vocab_size(config) -> int:
  """codebook + [MASK] + classes + null class."""
  return config.codebook_size + config.num_classes + 2


def class_tokens(labels, codebook_size):
  """Labels in [0, num_classes] (null = num_classes) -> their ids codebook + 1 + label."""
  return labels.astype(jnp.int32) + codebook_size + 1


def check_token_ids(tokens, codebook_size, allow_mask=True):
  """Refuses concrete token ids outside [0, codebook_size] ([MASK] = codebook_size allowed where
  `allow_mask`) in one line; traced ids are not checked."""
  if isinstance(tokens, jax.core.Tracer):
    return
  values = np.asarray(tokens)
  top = codebook_size + int(allow_mask)
  if values.size and (values.min() < 0 or values.max() >= top):
    raise TesseraxError(f"token ids in [{values.min()}, {values.max()}]; this generator takes "
                        f"ids in [0, {top}) (codebook {codebook_size}"
                        + (", mask token included)" if allow_mask else ")"))


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis with `scale` (weight) and `bias`, computed in (at
  least) float32 as mean((x - mean)^2)."""

  def __init__(self, dim, eps):
    self.eps = eps
    self.scale = nnx.Param(nnx.with_partitioning(jax.nn.initializers.ones, ("embed",))(
        None, (dim,)))
    self.bias = nnx.Param(nnx.with_partitioning(jax.nn.initializers.zeros, ("embed",))(
        None, (dim,)))

  def __call__(self, x):
    y = layers.layer_norm(x, self.eps)
    return y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)


def _embed(num, dim, init, dtype, rngs):
  return nnx.Embed(num, dim, dtype=dtype, rngs=rngs,
                   embedding_init=nnx.with_partitioning(init, ("vocab", "embed")))


def reinit_linears(module, init, key):
  """Every Linear kernel of `module` redrawn from `init` (the official networks initialise all
  Linears alike, the shared attention's included; biases stay 0)."""
  linears = [m for _, m in nnx.iter_graph(module) if isinstance(m, nnx.Linear)]
  for m, k in zip(linears, jax.random.split(key, len(linears))):
    m.kernel.set_value(init(k, m.kernel.shape, m.kernel.dtype))


def _dropout(x, rate, key):
  if key is None or rate <= 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class BertLayer(nnx.Module):
  """HF BertLayer (post-LN). Official keys under `model.encoder.layer.{i}.`:
    attention.q / k / v   attention.self.query / key / value
    attention.proj        attention.output.dense
    attention_norm        attention.output.LayerNorm
    intermediate          intermediate.dense
    output                output.dense
    output_norm           output.LayerNorm
  """

  def __init__(self, dim, heads, hidden, *, dtype, rngs):
    self.attention = Attention(dim, heads, fused_qkv=False, dtype=dtype, rngs=rngs)
    self.attention_norm = LayerNorm(dim, 1e-12)
    self.intermediate = layers.linear(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.output = layers.linear(hidden, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.output_norm = LayerNorm(dim, 1e-12)

  def __call__(self, x, rate, keys):
    x = self.attention_norm(x + _dropout(self.attention(x), rate, keys[0]))
    h = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
    return self.output_norm(x + _dropout(h, rate, keys[1]))


class MaskGITBert(nnx.Module):
  """ImageBert (TiTok L-32 / B-64). Official keys:
    word_embeddings        model.embeddings.word_embeddings.weight [vocab, hidden]
    position_embeddings    model.embeddings.position_embeddings.weight [N + 1, hidden]
    token_type_embeddings  model.embeddings.token_type_embeddings.weight [2, hidden] (row 0
                           used)
    embeddings_norm        model.embeddings.LayerNorm
    layers[i]              model.encoder.layer.{i} (BertLayer)
    lm_head                model.lm_head
  (`model.embeddings.position_ids`, a buffer of arange(N + 1) in older transformers, holds no
  parameter.)
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.dtype)
    normal = jax.nn.initializers.normal(0.02)
    self.codebook_size, self.num_classes = c.codebook_size, c.num_classes
    self.seq_len, self.dropout = c.seq_len, float(c.dropout)
    d = c.hidden_size
    self.word_embeddings = _embed(vocab_size(c), d, normal, dtype, rngs)
    self.position_embeddings = _embed(c.seq_len + 1, d, normal, dtype, rngs)
    self.token_type_embeddings = _embed(2, d, normal, dtype, rngs)
    self.embeddings_norm = LayerNorm(d, 1e-12)
    self.layers = nnx.List([BertLayer(d, c.num_heads, c.intermediate_size, dtype=dtype,
                                      rngs=rngs) for _ in range(c.num_layers)])
    self.lm_head = layers.linear(d, c.codebook_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
    reinit_linears(self, normal, rngs.params())

  def __call__(self, tokens, labels, train: bool = False, key=None):
    """tokens [B, N] int32 in [0, codebook] (codebook = [MASK]); labels [B] in [0, num_classes]
    (null = num_classes) -> logits [B, N, codebook] (float32). With `train` and a `key`, the
    hidden dropout of the official config is applied."""
    check_token_ids(tokens, self.codebook_size)
    ids = jnp.concatenate([class_tokens(labels, self.codebook_size)[:, None], tokens], axis=1)
    x = self.word_embeddings(ids)
    x = x + (self.position_embeddings.embedding[...][None, :ids.shape[1]]
             + self.token_type_embeddings.embedding[...][0]).astype(x.dtype)
    use_dropout = train and key is not None and self.dropout > 0
    keys = (jax.random.split(key, 2 * len(self.layers) + 1) if use_dropout
            else [None] * (2 * len(self.layers) + 1))
    x = _dropout(self.embeddings_norm(x), self.dropout, keys[0])
    for i, layer in enumerate(self.layers):
      x = layer(x, self.dropout, keys[2 * i + 1:2 * i + 3])
    return layers.at_least_f32(self.lm_head(x[:, 1:]))


class UViTBlock(nnx.Module):
  """modeling/modules/blocks.py UViTBlock. Official keys under `in_blocks.{i}.`, `mid_block.`
  or `out_blocks.{i}.`:
    norm1, norm2            norm1, norm2
    attn.qkv (no bias)      attn.qkv.weight [3 hidden, hidden], rows [q | k | v] by head
    attn.proj               attn.proj
    mlp.fc1, mlp.fc2        mlp.fc1, mlp.fc2
    skip_linear             skip_linear (out-blocks only)
  """

  def __init__(self, dim, heads, hidden, *, skip, dtype, rngs):
    self.skip_linear = (layers.linear(2 * dim, dim, (None, "embed"), dtype=dtype, rngs=rngs)
                        if skip else None)
    self.norm1 = LayerNorm(dim, 1e-5)
    self.attn = Attention(dim, heads, dtype=dtype, rngs=rngs)
    # UViT's qkv has no bias (qkv_bias=False); the shared attention's qkv Linear always has one.
    self.attn.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs,
                               kernel_init=nnx.with_partitioning(
                                   jax.nn.initializers.xavier_uniform(), ("embed", "heads")))
    self.norm2 = LayerNorm(dim, 1e-5)
    self.mlp = layers.Mlp(dim, hidden, approximate_gelu=False, dtype=dtype, rngs=rngs)

  def __call__(self, x, skip=None):
    if self.skip_linear is not None:
      x = self.skip_linear(jnp.concatenate([x, skip], axis=-1))
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class MaskGITUViT(nnx.Module):
  """UViTBert (TiTok S-128). Official keys:
    embeddings      embeddings.weight [vocab, hidden]
    pos_embed       pos_embed [1, N + 1, hidden]
    in_blocks[i]    in_blocks.{i}   (i < num_layers // 2)
    mid_block       mid_block
    out_blocks[i]   out_blocks.{i}  (with skip_linear)
    norm            norm
    lm_head         lm_head
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.dtype)
    trunc = jax.nn.initializers.truncated_normal(0.02)
    self.codebook_size, self.num_classes, self.seq_len = c.codebook_size, c.num_classes, c.seq_len
    d, half = c.hidden_size, c.num_layers // 2
    block = lambda skip: UViTBlock(d, c.num_heads, c.intermediate_size, skip=skip, dtype=dtype,
                                   rngs=rngs)
    self.embeddings = _embed(vocab_size(c), d, trunc, dtype, rngs)
    self.pos_embed = nnx.Param(nnx.with_partitioning(trunc, (None, None, "embed"))(
        rngs.params(), (1, c.seq_len + 1, d)))
    self.in_blocks = nnx.List([block(False) for _ in range(half)])
    self.mid_block = block(False)
    self.out_blocks = nnx.List([block(True) for _ in range(half)])
    self.norm = LayerNorm(d, 1e-5)
    self.lm_head = layers.linear(d, c.codebook_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
    reinit_linears(self, trunc, rngs.params())

  def __call__(self, tokens, labels, train: bool = False, key=None):
    """As MaskGITBert.__call__; the UViT has no dropout, so `train` and `key` change nothing."""
    del train, key
    check_token_ids(tokens, self.codebook_size)
    ids = jnp.concatenate([class_tokens(labels, self.codebook_size)[:, None], tokens], axis=1)
    x = self.embeddings(ids)
    x = x + self.pos_embed[...][:, :ids.shape[1]].astype(x.dtype)
    skips = []
    for blk in self.in_blocks:
      x = blk(x)
      skips.append(x)
    x = self.mid_block(x)
    for blk in self.out_blocks:
      x = blk(x, skips.pop())
    return layers.at_least_f32(self.lm_head(self.norm(x)[:, 1:]))


registry.NETWORKS.register("maskgit_bert", MaskGITBert)
registry.NETWORKS.register("maskgit_uvit", MaskGITUViT)


def official_keys(config) -> dict:
  """{our flat parameter path ("layers.0.attention.q.kernel"): (the official state-dict key,
  "transpose" for a Linear kernel, whose torch weight is [out, in], or "copy")} of the network
  of `config`, one entry per parameter: what a converter of the released generator_titok_*.bin
  files reads (BERT's `model.embeddings.position_ids` buffer, where present, has no entry)."""
  keys = {}

  def linear(ours, theirs):
    keys[ours + ".kernel"] = (theirs + ".weight", "transpose")
    keys[ours + ".bias"] = (theirs + ".bias", "copy")

  def norm(ours, theirs):
    keys[ours + ".scale"] = (theirs + ".weight", "copy")
    keys[ours + ".bias"] = (theirs + ".bias", "copy")

  if config.name == "maskgit_bert":
    for ours, theirs in (("word_embeddings", "word_embeddings"),
                         ("position_embeddings", "position_embeddings"),
                         ("token_type_embeddings", "token_type_embeddings")):
      keys[ours + ".embedding"] = (f"model.embeddings.{theirs}.weight", "copy")
    norm("embeddings_norm", "model.embeddings.LayerNorm")
    for i in range(config.num_layers):
      ours, theirs = f"layers.{i}.", f"model.encoder.layer.{i}."
      for q, name in (("q", "query"), ("k", "key"), ("v", "value")):
        linear(ours + "attention." + q, theirs + "attention.self." + name)
      linear(ours + "attention.proj", theirs + "attention.output.dense")
      norm(ours + "attention_norm", theirs + "attention.output.LayerNorm")
      linear(ours + "intermediate", theirs + "intermediate.dense")
      linear(ours + "output", theirs + "output.dense")
      norm(ours + "output_norm", theirs + "output.LayerNorm")
    linear("lm_head", "model.lm_head")
    return keys
  keys["embeddings.embedding"] = ("embeddings.weight", "copy")
  keys["pos_embed"] = ("pos_embed", "copy")
  half = config.num_layers // 2
  blocks = ([f"in_blocks.{i}" for i in range(half)] + ["mid_block"]
            + [f"out_blocks.{i}" for i in range(half)])
  for name in blocks:
    norm(name + ".norm1", name + ".norm1")
    norm(name + ".norm2", name + ".norm2")
    keys[name + ".attn.qkv.kernel"] = (name + ".attn.qkv.weight", "transpose")
    linear(name + ".attn.proj", name + ".attn.proj")
    linear(name + ".mlp.fc1", name + ".mlp.fc1")
    linear(name + ".mlp.fc2", name + ".mlp.fc2")
    if name.startswith("out_blocks"):
      linear(name + ".skip_linear", name + ".skip_linear")
  norm("norm", "norm")
  linear("lm_head", "lm_head")
  return keys


def count_params(config) -> int:
  """Parameters of the network (the official state dict's, without BERT's position_ids)."""
  model = nnx.eval_shape(lambda: registry.NETWORKS.get(config.name)(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
