"""The token generator task: a network over 1D token ids (config.model.name: "maskgit_bert",
"maskgit_uvit" or "autoregressive") trained with config.objective.name ("masked_tokens" or
"next_token") on a token cache (data.name "latents" over a discrete tokenizer's cache, whose
int32 ids arrive as batch["image"] [B, *latent_shape], flattened to [B, K] row-major), sampled
by config.sample.solver ("maskgit" or "autoregressive").

predict["generate"](params, labels, key, settings=None, batch_size=None, decode=True) gives
int32 token ids [N, K]; where a tokenizer is configured (config.tokenizer.dir, else the token
cache's tokenizer) and `decode`, the images it decodes them to (what evaluators score).
predict["generate_tokens"] always gives the ids. A tokenizer whose codebook or token count
differs from the model's is refused in one line (`check_pairing`). The train state is
core/train_state.py's; buffers (RoPE tables) are recomputed from the config.
"""
import functools
import json
import math
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from tesserax.core import optim, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.objectives.context import Context
from tesserax.sampling.autoregressive_decode import CachedModel


# The objective each token network is trained with (the masked network sees [MASK] ids, the
# autoregressive one never does).
OBJECTIVE_OF = {"maskgit_bert": "masked_tokens", "maskgit_uvit": "masked_tokens",
                "autoregressive": "next_token"}


def build_network(model_config, seed: int = 0):
  return registry.NETWORKS.get(model_config.name)(model_config, rngs=nnx.Rngs(seed))


def check_pairing(tokenizer_model, model_config, where="the tokenizer"):
  """Refuses a tokenizer (the network of tokenizers/tokenizer.py) whose ids the generator
  cannot model: continuous latents, another codebook size or another token count."""
  if not tokenizer_model.is_discrete:
    raise TesseraxError(f"{where} gives continuous latents; a token generator needs a discrete "
                        "tokenizer")
  if tokenizer_model.codebook_size != model_config.codebook_size:
    raise TesseraxError(f"{where} has a codebook of {tokenizer_model.codebook_size}; this "
                        f"generator models {model_config.codebook_size} codes")
  tokens = math.prod(tokenizer_model.latent_shape)
  if tokens != model_config.seq_len:
    raise TesseraxError(f"{where} gives {tokens} tokens per image; this generator models "
                        f"{model_config.seq_len} (model.seq_len)")


@functools.lru_cache(maxsize=2)
def _load_tokenizer(directory):
  from tesserax.tokenizers import tokenizer as tokenizer_lib
  return tokenizer_lib.load(directory)


def token_source(config):
  """(tokenizer directory or None, the token shape of one example): config.tokenizer.dir, else
  the token cache's tokenizer; the cache's latent shape, else [model.seq_len]."""
  shape, directory = (config.model.seq_len,), config.get("tokenizer", {}).get("dir")
  if config.data.name == "latents" and config.data.data_dir:
    from tesserax.data import cache
    info = cache.read_info(os.path.abspath(config.data.data_dir))
    shape = tuple(info["latent_shape"])
    if math.prod(shape) != config.model.seq_len:
      raise TesseraxError(f"the token cache {config.data.data_dir} holds {math.prod(shape)} tokens "
                          f"per image; this generator models {config.model.seq_len} "
                          "(model.seq_len)")
    directory = directory or info["tokenizer"]["dir"]
  return (os.path.abspath(directory) if directory else None), shape


@registry.TASKS.register("token_generator")
class TokenGeneratorTask:
  """Everything derived from (config, mesh) once: graph, shardings, optimizer, jitted fns."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    c = config
    if OBJECTIVE_OF.get(c.model.name, c.objective.name) != c.objective.name:
      raise TesseraxError(f"model {c.model.name} is trained with objective "
                          f"{OBJECTIVE_OF[c.model.name]}, not {c.objective.name}")
    self.tokenizer_dir, token_shape = token_source(c)
    if self.tokenizer_dir:
      check_pairing(_load_tokenizer(self.tokenizer_dir).model, c.model,
                    f"tokenizer {self.tokenizer_dir}")
    self.abstract_model = nnx.eval_shape(lambda: build_network(c.model, c.seed))
    self.graphdef, abstract_params, _ = nnx.split(self.abstract_model, nnx.Param, ...)
    self.tx = optim.make_optimizer(c.optim, c.num_steps)
    self.objective = registry.OBJECTIVES.get(c.objective.name)(c)
    names = sharding.logical_names(abstract_params)
    param_sh = sharding.param_shardings(nnx.to_pure_dict(abstract_params), names, mesh)
    abstract_state = jax.eval_shape(self._init)
    self.state_shardings = train_state.state_shardings(abstract_state, param_sh, self.tx, mesh)
    self.abstract_state = train_state.shard_abstract(abstract_state, self.state_shardings)
    rep = sharding.replicated(mesh)
    self.buffers = jax.jit(lambda: nnx.to_pure_dict(nnx.state(
        build_network(c.model, c.seed), nnx.Not(nnx.Param))), out_shardings=rep)()
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    batch_sh = {"image": sharding.batch_sharding(mesh, 1 + len(token_shape)),
                "label": sharding.batch_sharding(mesh, 1)}
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh),
                              out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    self.predict = {"generate": self.generate, "generate_tokens": functools.partial(
        self.generate, decode=False)}

  def model(self, params):
    return nnx.merge(self.graphdef, params, self.buffers)

  def apply(self, params, tokens, labels, *, train=False, key=None):
    """The network at `params` (the `apply` objectives and samplers see)."""
    return self.model(params)(tokens, labels, train, key)

  def predictions(self):
    """{kind: predict} of the objective for the samplers; an autoregressive network's comes
    with its KV-cache decoding (sampling/autoregressive_decode.py CachedModel)."""
    out = {kind: functools.partial(fn, self.apply)
           for kind, fn in self.objective.predictions.items()}
    if "next_token_logits" in out:
      out["next_token_logits"] = CachedModel(
          logits=out["next_token_logits"],
          init_cache=self.abstract_model.init_cache,
          step=lambda params, prev, labels, cache, position: self.model(params).decode(
              prev, labels, cache, position))
    return out

  def _init(self):
    model = build_network(self.config.model, self.config.seed)
    return train_state.new_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), self.tx,
                                 self.config.seed)

  def _train_step(self, state, batch):
    c = self.config
    ctx = Context(step=state["step"], key=train_state.step_key(state),
                  num_classes=c.model.num_classes, ema=state["ema"])
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: self.objective.loss(self.apply, p, batch, ctx), has_aux=True)(state["params"])
    new_state, step_metrics = train_state.optimizer_step(state, loss, grads, self.tx, c)
    return new_state, dict(metrics, **step_metrics)

  @functools.lru_cache(maxsize=4)
  def _sampler(self, settings_json):
    settings = ml_collections.ConfigDict(json.loads(settings_json))
    sampler = registry.SAMPLERS.get(settings.solver)
    predictions = self.predictions()
    if sampler.consumes not in predictions:
      raise TesseraxError(f"{settings.solver} needs {sampler.consumes}; this model gives "
                          f"{' or '.join(predictions)}")
    m = self.config.model
    return sampler.make(predictions[sampler.consumes], settings, seq_len=m.seq_len,
                        codebook_size=m.codebook_size, null_label=m.num_classes, mesh=self.mesh)

  def generate(self, params, labels, key, settings=None, batch_size=None, decode=True):
    """Token ids [N, K] int32 for `labels` (host int32), or with a configured tokenizer and
    `decode` its host float32 NHWC images; `settings` (default config.sample) choose the
    sampler. Batch i of `batch_size` (default all) draws its noise from fold_in(key, i)."""
    settings = settings or self.config.sample
    sample = self._sampler(settings.to_json())
    labels = np.asarray(labels, np.int32)
    if labels.size and (labels.min() < 0 or labels.max() > self.config.model.num_classes):
      raise TesseraxError(f"labels in [{labels.min()}, {labels.max()}]; this generator has "
                          f"{self.config.model.num_classes} classes (null = "
                          f"{self.config.model.num_classes})")
    ids = sharding.map_batched(
        lambda i, y: sample(params, y, jax.random.fold_in(key, i)), (labels,),
        batch_size or max(len(labels), 1), self.mesh, fixed_shape=False, with_index=True)
    if decode and self.tokenizer_dir:
      return self.decode_tokens(ids)
    return ids

  def decode_tokens(self, ids):
    """Images of token ids [N, K] through the configured tokenizer (host float32 NHWC)."""
    from tesserax.generators.maskgit import check_token_ids
    if not self.tokenizer_dir:
      raise TesseraxError("no tokenizer configured (config.tokenizer.dir or a token cache) to "
                          "decode token ids")
    tokenizer = _load_tokenizer(self.tokenizer_dir)
    check_token_ids(ids, tokenizer.model.codebook_size, allow_mask=False)
    ids = np.asarray(ids, np.int32).reshape((len(ids),) + tuple(tokenizer.model.latent_shape))
    return tokenizer.decode_normalized(ids)

  def sample_grid(self, params):
    """EMA samples, one row per class: decoded images with a tokenizer, else the token ids as
    gray levels (one row of K pixels per sample)."""
    c = self.config
    per_class = c.sample.num_per_class
    labels = np.repeat(np.arange(c.model.num_classes, dtype=np.int32), per_class)
    out = self.generate(params, labels, jax.random.PRNGKey(c.seed))
    if self.tokenizer_dir:
      return out, per_class, 1
    gray = out.astype(np.float32) / max(c.model.codebook_size - 1, 1) * 2 - 1
    return gray[:, None, :, None], per_class, 4

  def export(self, state, workdir, log=print):
    del state, workdir, log  # a generator's checkpoints are its export
