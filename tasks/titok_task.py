"""The TiTok tokenizer task: single-stage training of a TiTok (tokenizers/titok.py), the recipe
of the TA-TiTok training configs (bytedance/1d-tokenizer configs/training/TA-TiTok/*.yaml,
modeling/modules/losses.py ReconstructionLoss_Single_Stage) without its GAN term:

  loss = reconstruction_weight * mean (x - x_rec)^2
       + perceptual_weight * perceptual(x, x_rec)
       + quantizer_weight * VQ loss          (VQ: codebook + 0.25 commitment)
       + kl_weight * KL                      (VAE: the diagonal Gaussian, fixed logvar 0 upstream)

`loss.perceptual` is "lpips" (VGG LPIPS; `tesserax weights fetch lpips_vgg`), "digits_net"
(the mean squared difference of the digits classifier's logits, the offline stand-in for the
ConvNeXt-S logit loss, as the official perceptual loss compares ConvNeXt-S logits) or "" (off).
A VAE TiTok decodes a posterior sample during training. The optimizer is AdamW with the
official weight-decay exclusions (no decay on parameters with fewer than 2 dimensions, nor on
the latent tokens, embeddings and norms). At the end of a run the EMA model is exported to
WORKDIR/tokenizer (tokenizers/tokenizer.py's directory format), with per-channel latent
statistics for a VAE TiTok.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tesserax.core import optim, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.eval.evaluators import eval_images
from tesserax.tasks import autoencoder
from tesserax.tokenizers import reconstruct, titok

# Parameter names the official AdamW leaves undecayed (utils/train_utils.py create_optimizer).
NO_DECAY_NAMES = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma",
                  "embed", "codebook", "positional")


def decays(params) -> dict:
  """True for the parameters AdamW decays: matrices whose path names none of NO_DECAY_NAMES."""
  def decayed(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    return leaf.ndim >= 2 and not any(n in name for name in names for n in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decayed, params)


def _perceptual(name, resolution):
  """(frozen module, fn(module, x, x_rec) -> [B]) of `loss.perceptual`, or None."""
  if name == "lpips":
    from tesserax.backbones import weights
    return weights.load("lpips_vgg"), lambda net, x, rec: net(x, rec)
  if name == "digits_net":
    from tesserax.backbones.digits_net import load_classifier

    def logits_mse(net, x, rec):
      gray = lambda images: jnp.mean(images, axis=-1, keepdims=True)
      return jnp.mean((net(gray(x)) - net(gray(rec))) ** 2, axis=-1)

    return load_classifier(resolution), logits_mse
  if name:
    raise TesseraxError(f"unknown loss.perceptual {name!r}; choose lpips, digits_net or ''")
  return None


@registry.TASKS.register("titok")
class TiTokTask:
  """The Task (training/task.py) of a TiTok recipe."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    c = config
    rep = sharding.replicated(mesh)
    perceptual = _perceptual(c.loss.perceptual, c.model.resolution)
    self.frozen_graphdef, frozen = None, {}
    if perceptual:
      module, self.perceptual_fn = perceptual
      self.frozen_graphdef, frozen = nnx.split(module)
    self.frozen = jax.device_put(frozen, rep)
    abstract = nnx.eval_shape(lambda: titok.build(c.model, c.seed))
    self.graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    self.buffers = jax.device_put(nnx.to_pure_dict(nnx.state(
        titok.build(c.model, c.seed), nnx.Not(nnx.Param))), rep)
    self.tx = optim.make_optimizer(c.optim, c.num_steps, mask=decays)
    names = sharding.logical_names(abstract_params)
    param_sh = sharding.param_shardings(nnx.to_pure_dict(abstract_params), names, mesh)
    abstract_state = jax.eval_shape(self._init)
    self.state_shardings = train_state.state_shardings(abstract_state, param_sh, self.tx, mesh)
    self.abstract_state = train_state.shard_abstract(abstract_state, self.state_shardings)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    batch_sh = {"image": sharding.batch_sharding(mesh, 4),
                "label": sharding.batch_sharding(mesh, 1)}
    step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh, rep),
                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    self.train_step = lambda state, batch: step(state, batch, self.frozen)
    self.predict = {"reconstruct": self.reconstruct, "encode": self.encode}

  def model(self, params):
    return nnx.merge(self.graphdef, params, self.buffers)

  def _init(self):
    model = titok.build(self.config.model, self.config.seed)
    return train_state.new_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), self.tx,
                                 self.config.seed)

  def _train_step(self, state, batch, frozen):
    c, loss_cfg = self.config, self.config.loss
    x = batch["image"]
    key = train_state.step_key(state)

    def loss_fn(params):
      rec, aux = self.model(params)(x, key=key)
      terms = {"reconstruction": jnp.mean((x - rec) ** 2)}
      if self.frozen_graphdef is not None:
        net = nnx.merge(self.frozen_graphdef, frozen)
        terms["perceptual"] = jnp.mean(self.perceptual_fn(net, x, rec))
      if "quantizer_loss" in aux:
        terms["quantizer"] = aux["quantizer_loss"]
      else:
        terms["kl"] = jnp.mean(aux["kl"])
      weights = {"reconstruction": loss_cfg.reconstruction_weight,
                 "perceptual": loss_cfg.perceptual_weight,
                 "quantizer": loss_cfg.quantizer_weight, "kl": loss_cfg.kl_weight}
      loss = sum(weights[k] * v for k, v in terms.items())
      metrics = dict(terms, loss=loss)
      if "ids" in aux:
        used = jnp.zeros(c.model.codebook_size, bool).at[aux["ids"].reshape(-1)].set(True)
        metrics["codebook_usage"] = jnp.mean(used)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_state, step_metrics = train_state.optimizer_step(state, loss, grads, self.tx, c)
    return new_state, dict(metrics, **step_metrics)

  def reconstruct(self, params, images, batch_size=None):
    """decode(encode(images)) of host images in [-1, 1] over the training mesh."""
    return reconstruct.reconstruct(self.model(params), images,
                                   batch_size or self.config.batch_size, self.mesh)

  def encode(self, params, images, batch_size=None):
    """Token ids [N, K] (VQ) or posterior means [N, K, C] (VAE) of host images in [-1, 1]."""
    model = self.model(params)
    return sharding.map_batched(jax.jit(model.encode), (np.asarray(images, np.float32),),
                                batch_size or self.config.batch_size, self.mesh)

  def sample_grid(self, params):
    return autoencoder.reconstruction_grid(self.config, self.reconstruct, params)

  def export(self, state, workdir, log=print):
    """WORKDIR/tokenizer: the EMA TiTok; a VAE TiTok with per-channel statistics of the
    posterior means of the first export.num_images training images."""
    from tesserax.tokenizers import tokenizer
    model = self.model(state["ema"])
    stats = None
    if not model.is_discrete:
      images = eval_images(self.config.data, self.config.data.split,
                           self.config.export.num_images)
      latents = np.asarray(self.encode(state["ema"], images), np.float64)
      stats = {"mean": latents.mean((0, 1)).astype(np.float32),
               "std": latents.std((0, 1)).astype(np.float32)}
    if jax.process_index() == 0:
      directory = os.path.join(workdir, "tokenizer")
      tokenizer.save(directory, "titok", "titok", self.config.model,
                     tokenizer.flat_params(model), stats)
      log(f"exported the EMA tokenizer to {directory}")
