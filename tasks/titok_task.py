"""The TiTok tokenizer task: TiTok's two-stage recipe and the single-stage recipe
(tokenizers/titok.py; bytedance/1d-tokenizer scripts/train_titok.py, utils/train_utils.py,
modeling/modules/losses.py, configs/training/TiTok/stage{1,2}/*.yaml and
configs/training/TA-TiTok/*.yaml). `loss.recipe` picks one:

"single_stage" (ReconstructionLoss_Single_Stage, the TA-TiTok settings):
  loss = reconstruction_weight * mean (x - x_rec)^2   (x in [-1, 1])
       + perceptual_weight * perceptual(x, x_rec)
       + quantizer_weight * VQ loss          (VQ: codebook + 0.25 commitment)
       + kl_weight * KL                      (VAE: the diagonal Gaussian, fixed logvar 0 upstream)
       + discriminator_weight * factor * (-mean D(x_rec))   (the GAN, when discriminator_weight > 0)
  A VAE TiTok decodes a posterior sample during training.

"stage1" (the proxy-code warm-up, TiTok §3.3): a legacy TiTok without pixel decoder
  (finetune_decoder False) predicts the codes of a frozen MaskGIT-VQGAN (`loss.vqgan`):
  loss = cross-entropy of its 1024-way logits at every grid position + quantizer_weight * VQ
  loss (titok.stage1_loss). Its reconstructions decode the logits' argmax with that VQGAN.

"stage2" (decoder fine-tuning, ReconstructionLoss_Stage2): the encoder, the latent tokens and
  the codebook are frozen (no gradient, no update, no EMA drift; the quantizer loss is zeroed)
  and the decoder (+ the MaskGIT-VQGAN pixel codebook and decoder of a legacy TiTok) trains on,
  with images mapped to [0, 1] as the official loss sees them,
  loss = reconstruction_weight * mean (x - x_rec)^2 + perceptual_weight * perceptual
       + discriminator_weight * factor * (-mean D(x_rec))     (no adaptive weight).
  It starts from the stage-1 export `loss.stage1` (a tokenizer directory; "" = random, tests
  only), the pixel codebook and decoder from `loss.vqgan` (titok.pixel_params).

`loss.vqgan`: a tokenizer directory holding a MaskGIT-VQGAN (`tesserax convert --kind
maskgit-vqgan`), or "random": the `model.pixel` architecture at random init (seed + 1), the
offline stand-in for digits.

`loss.perceptual` (each per image, averaged over the batch):
  "convnext_s"        the ConvNeXt-S logit loss (backbones/convnext.logit_loss; `tesserax weights
                      fetch convnext_small`), the two-stage recipe's, with perceptual_weight 0.1;
  "lpips-convnext_s"  (1.0 LPIPS + 0.1 ConvNeXt-S) / 1.1, PerceptualLoss("lpips-convnext_s-1.0-
                      0.1") of the TA-TiTok configs, with perceptual_weight 1.1;
  "lpips"             VGG LPIPS (`tesserax weights fetch lpips_vgg`);
  "digits_net"        the mean squared difference of the digits classifier's logits, the offline
                      stand-in for the ConvNeXt-S logit loss;
  ""                  off.
One-channel images are repeated to RGB for ConvNeXt-S.

GAN (`discriminator_weight` > 0; the two-stage recipe: 0.01 from step 20,000; TA-TiTok: 0.1
from step 200,000): the MaskBit discriminator (tokenizers/titok_losses.py; `disc`: hidden,
num_stages, pool_size) on images in [0, 1], trained after each generator step on the same
batch and the detached reconstructions with
  discriminator_factor * hinge(D(x), D(x_rec)) + lecam_weight * LeCam(EMAs, decay lecam_decay),
its own AdamW `disc_optim` whose schedule runs over the num_steps - discriminator_start steps
it trains: before `discriminator_start` the discriminator, its optimizer and the LeCam EMAs are
left as they are and the generator's GAN term is 0 (should_discriminator_be_trained).

The optimizer is AdamW with the official weight-decay exclusions (no decay on parameters with
fewer than 2 dimensions, nor on the latent tokens, embeddings and norms). At the end of a run the
EMA model is exported to WORKDIR/tokenizer (tokenizers/tokenizer.py's directory format), with
per-channel latent statistics for a VAE TiTok.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import traverse_util

from tesserax.core import optim, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.eval.evaluators import eval_images
from tesserax.tasks import autoencoder
from tesserax.tokenizers import (losses, maskgit_vqgan, quantizers, reconstruct, titok,
                                 titok_losses)

RECIPES = ("single_stage", "stage1", "stage2")
# Parameter names the official AdamW leaves undecayed (utils/train_utils.py create_optimizer).
NO_DECAY_NAMES = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma",
                  "embed", "codebook", "positional")
# What stage 2 freezes (TiTok.forward under finetune_decoder: the encoder and quantizer run
# under no_grad; train_utils.py: latent_tokens.requires_grad_(False)).
STAGE2_FROZEN = ("latent_tokens", "encoder", "codebook")
LPIPS_CONVNEXT_MIX = (1.0, 0.1)  # PerceptualLoss("lpips-convnext_s-1.0-0.1")


def decays(params) -> dict:
  """True for the parameters AdamW decays: matrices whose path names none of NO_DECAY_NAMES."""
  def decayed(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    return leaf.ndim >= 2 and not any(n in name for name in names for n in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decayed, params)


def _build(factory):
  """The module `factory` builds, its initial values computed in one compiled call (not op by
  op)."""
  graphdef, _ = nnx.split(nnx.eval_shape(factory))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(factory()))())


def _rgb(images):
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _convnext_loss(nets, x, rec):
  from tesserax.backbones import convnext
  return convnext.logit_loss(nets["convnext_s"], _rgb((x + 1) / 2), _rgb((rec + 1) / 2))


def _perceptual(name, resolution):
  """({name: frozen module}, fn(modules, x, x_rec) -> [B]) of `loss.perceptual`, or None."""
  if name in ("convnext_s", "lpips", "lpips-convnext_s"):
    from tesserax.backbones import weights
    nets = {part: weights.load({"convnext_s": "convnext_small", "lpips": "lpips_vgg"}[part])
            for part in name.split("-")}
    if name == "convnext_s":
      return nets, _convnext_loss
    if name == "lpips":
      return nets, lambda m, x, rec: m["lpips"](x, rec)
    w_lpips, w_convnext = LPIPS_CONVNEXT_MIX
    return nets, lambda m, x, rec: (w_lpips * m["lpips"](x, rec) + w_convnext
                                    * _convnext_loss(m, x, rec)) / (w_lpips + w_convnext)
  if name == "digits_net":
    from tesserax.backbones.digits_net import load_classifier

    def logits_mse(m, x, rec):
      gray = lambda images: jnp.mean(images, axis=-1, keepdims=True)
      return jnp.mean((m["digits_net"](gray(x)) - m["digits_net"](gray(rec))) ** 2, axis=-1)

    return {"digits_net": load_classifier(resolution)}, logits_mse
  if name:
    raise TesseraxError(f"unknown loss.perceptual {name!r}; choose convnext_s, lpips-convnext_s, "
                        "lpips, digits_net or ''")
  return None


def _vqgan(spec, model_config, seed):
  """The MaskGIT-VQGAN of `loss.vqgan`: a tokenizer directory, or "random"."""
  if spec == "random":
    return _build(lambda: maskgit_vqgan.MaskGitVQGAN(model_config.pixel,
                                                      rngs=nnx.Rngs(seed + 1)))
  if not spec:
    raise TesseraxError("loss.vqgan is empty: give the MaskGIT-VQGAN tokenizer directory "
                        "(tesserax convert --kind maskgit-vqgan) or 'random'")
  from tesserax.tokenizers import tokenizer
  loaded = tokenizer.load(spec)
  if loaded.family != "maskgit_vqgan":
    raise TesseraxError(f"loss.vqgan={spec} holds a {loaded.family} tokenizer, not a "
                        "MaskGIT-VQGAN")
  return loaded.model


def _flat(tree) -> dict:
  return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def _stage2_sources(c, shapes) -> dict:
  """Flat stage-2 starting params read from files: every parameter of the stage-1 export
  `loss.stage1` (shapes checked against `shapes`, the model's {key: shape}) and, for a legacy
  TiTok and a `loss.vqgan` directory, the pixel codebook and decoder (titok.pixel_params).
  The rest, and a "random" VQGAN's, come from the initialisation (`TiTokTask._init`)."""
  from tesserax.core.files import read_npz
  from tesserax.tokenizers import tokenizer
  params = {}
  if c.loss.stage1:
    source = os.path.join(c.loss.stage1, tokenizer.PARAMS_FILE)
    stage1 = read_npz(source, "stage-1 tokenizer parameters")
    bad = sorted(k for k, v in stage1.items()
                 if k.startswith("pixel_") or tuple(v.shape) != shapes.get(k))
    missing = sorted(k for k in shapes if not k.startswith("pixel_") and k not in stage1)
    if bad or missing:
      raise TesseraxError(f"{source} is not a stage-1 export of this TiTok: mismatched "
                          f"{bad[:5]}, missing {missing[:5]}")
    params.update(stage1)
  if c.model.legacy and c.loss.vqgan != "random":
    vqgan = tokenizer.flat_params(_vqgan(c.loss.vqgan, c.model, c.seed))
    params.update(titok.pixel_params(vqgan))
  return params


@registry.TASKS.register("titok")
class TiTokTask:
  """The Task (training/task.py) of a TiTok recipe."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    c, loss = config, config.loss
    self.recipe = loss.get("recipe", "single_stage")
    if self.recipe not in RECIPES:
      raise TesseraxError(f"unknown loss.recipe {self.recipe!r}; choose {', '.join(RECIPES)}")
    model = nnx.eval_shape(lambda: titok.build(c.model, c.seed))
    if self.recipe == "stage1" and (not c.model.legacy or c.model.finetune_decoder):
      raise TesseraxError("loss.recipe=stage1 trains a legacy TiTok without pixel decoder "
                          "(model.legacy=True, model.finetune_decoder=False)")
    if self.recipe == "stage2" and not model.is_discrete:
      raise TesseraxError("loss.recipe=stage2 fine-tunes the decoder of a VQ TiTok "
                          "(model.quantize=vq)")
    self.gan = self.recipe != "stage1" and loss.get("discriminator_weight", 0.0) > 0
    # TA-TiTok's clustering_vq moves the codebook as the encoder trains (single-stage only).
    self.cluster = model.is_discrete and c.model.clustering_vq and self.recipe == "single_stage"
    rep = sharding.replicated(mesh)
    frozen = {}
    if self.recipe == "stage1":
      frozen["proxy"] = _vqgan(loss.vqgan, c.model, c.seed)
    else:
      perceptual = _perceptual(loss.perceptual, c.model.resolution)
      if perceptual:
        modules, self.perceptual_fn = perceptual
        frozen.update(modules)
    self.frozen_graphdefs, frozen_state = {}, {}
    for name, module in frozen.items():
      self.frozen_graphdefs[name], frozen_state[name] = nnx.split(module)
    self.frozen = jax.device_put(frozen_state, rep)
    self.graphdef, abstract_params, _ = nnx.split(model, nnx.Param, ...)
    buffers = nnx.state(model, nnx.Not(nnx.Param))
    if jax.tree.leaves(buffers):  # TA-TiTok's embed_prob
      buffers = nnx.state(_build(lambda: titok.build(c.model, c.seed)), nnx.Not(nnx.Param))
    self.buffers = jax.device_put(nnx.to_pure_dict(buffers), rep)
    self.tx = optim.make_optimizer(c.optim, c.num_steps, mask=decays)
    if self.gan:
      self.disc_graphdef, _ = nnx.split(nnx.eval_shape(self._build_disc))
      self.disc_tx = optim.make_optimizer(c.disc_optim,
                                          max(c.num_steps - loss.discriminator_start, 1))
    names = sharding.logical_names(abstract_params)
    param_sh = sharding.param_shardings(nnx.to_pure_dict(abstract_params), names, mesh)
    initial = {}
    if self.recipe == "stage2":
      shapes = {k: tuple(v.shape) for k, v in _flat(nnx.to_pure_dict(abstract_params)).items()}
      initial = _stage2_sources(c, shapes)
    abstract_state = jax.eval_shape(self._init, initial)
    self.state_shardings = train_state.state_shardings(abstract_state, param_sh, self.tx, mesh)
    self.abstract_state = train_state.shard_abstract(abstract_state, self.state_shardings)
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.init = lambda: init(initial)
    self.train_step = autoencoder.jit_image_step(self._train_step, self.state_shardings, mesh,
                                                 self.frozen)
    self.predict = {"reconstruct": self.reconstruct, "encode": self.encode}

  def _build_disc(self):
    d = self.config.disc
    return titok_losses.MaskBitDiscriminator(self.config.model.channels, d.hidden, d.num_stages,
                                             d.pool_size, rngs=nnx.Rngs(self.config.seed + 2))

  def model(self, params):
    return nnx.merge(self.graphdef, params, self.buffers)

  def _frozen_module(self, frozen, name):
    return nnx.merge(self.frozen_graphdefs[name], frozen[name])

  def _init(self, initial):
    """The initial state; stage 2 overwrites the initialised params with `initial` (flat) and,
    from a "random" `loss.vqgan`, the pixel codebook and decoder with that VQGAN's."""
    c = self.config
    params = nnx.to_pure_dict(nnx.state(titok.build(c.model, c.seed), nnx.Param))
    if self.recipe == "stage2":
      flat = _flat(params)
      if c.model.legacy and c.loss.vqgan == "random":
        vqgan = maskgit_vqgan.MaskGitVQGAN(c.model.pixel, rngs=nnx.Rngs(c.seed + 1))
        flat.update(titok.pixel_params(_flat(nnx.to_pure_dict(nnx.state(vqgan, nnx.Param)))))
      flat.update(initial)
      params = traverse_util.unflatten_dict(
          {k: flat[".".join(map(str, k))] for k in traverse_util.flatten_dict(params)})
    extra = {}
    if self.gan:
      disc = nnx.to_pure_dict(nnx.state(self._build_disc(), nnx.Param))
      extra = dict(disc=disc, disc_opt=self.disc_tx.init(disc), lecam=jnp.zeros(2, jnp.float32))
    if self.cluster:  # the `embed_prob` buffer: an EMA of each code's share of the tokens
      extra["embed_prob"] = jnp.zeros(c.model.codebook_size, jnp.float32)
    return train_state.new_state(params, self.tx, self.config.seed, **extra)

  def _disc(self, disc_params, images):
    """D(images in [-1, 1]) on the [0, 1] images the official loss feeds it."""
    return nnx.merge(self.disc_graphdef, disc_params)((images + 1) / 2)

  def _forward(self, model, x, key):
    """(reconstruction in [-1, 1], aux) of the single-stage or stage-2 forward."""
    if self.recipe == "single_stage":
      return model(x, key=key)
    z = jax.lax.stop_gradient(model.encode_features(x))
    latents, ids, _, _ = model.quantize(z)
    rec = model.decode_latents(jax.lax.stop_gradient(latents))
    return rec, {"ids": ids, "quantizer_loss": jnp.zeros((), jnp.float32)}

  def _train_step(self, state, batch, frozen):
    c, loss_cfg = self.config, self.config.loss
    x = batch["image"]
    key = train_state.step_key(state)
    factor = (titok_losses.discriminator_factor(state["step"], loss_cfg.discriminator_start,
                                                loss_cfg.discriminator_factor)
              if self.gan else 0.0)

    def loss_fn(params):
      model = self.model(params)
      if self.recipe == "stage1":
        loss, metrics = titok.stage1_loss(model, self._frozen_module(frozen, "proxy"), x,
                                          loss_cfg.quantizer_weight)
        return loss, (metrics, None, None)
      rec, aux = self._forward(model, x, key)
      # ReconstructionLoss_Stage2 and ReconstructionLoss_Single_Stage compare [0, 1] images.
      terms = {"reconstruction": jnp.mean((0.5 * (x - rec)) ** 2)}
      if self.frozen_graphdefs:
        nets = {name: self._frozen_module(frozen, name) for name in self.frozen_graphdefs}
        terms["perceptual"] = jnp.mean(self.perceptual_fn(nets, x, rec))
      if "quantizer_loss" in aux:
        terms["quantizer"] = aux["quantizer_loss"]
      else:
        terms["kl"] = jnp.mean(aux["kl"])
      weights = {"reconstruction": loss_cfg.reconstruction_weight,
                 "perceptual": loss_cfg.perceptual_weight,
                 "quantizer": loss_cfg.quantizer_weight, "kl": loss_cfg.kl_weight}
      if self.gan:
        terms["gan"] = losses.generator_loss(self._disc(state["disc"], rec))
        weights["gan"] = loss_cfg.discriminator_weight * factor
      loss = sum(weights[k] * v for k, v in terms.items())
      metrics = dict(terms, loss=loss)
      if "ids" in aux:
        used = jnp.zeros(c.model.codebook_size, bool).at[aux["ids"].reshape(-1)].set(True)
        metrics["codebook_usage"] = jnp.mean(used)
      cluster = (aux["features"], aux["ids"], aux["distances"]) if self.cluster else None
      return loss, (metrics, rec, cluster)

    (loss, (metrics, rec, cluster)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    grad_norm = optim.global_norm(grads)
    params, extra = state["params"], {}
    if self.cluster:  # VectorQuantizer.forward moves the codebook before the optimizer step
      codebook, extra["embed_prob"] = quantizers.cluster_codebook(
          params["codebook"], state["embed_prob"], *cluster)
      params = dict(params, codebook=codebook)
    updates, opt = self.tx.update(grads, state["opt"], params)
    params = optax.apply_updates(params, updates)
    ema = optim.ema_update(state["ema"], params, c.ema_decay)
    if self.recipe == "stage2":  # zero gradients, but AdamW's decay must not move them either
      params = dict(params, **{k: state["params"][k] for k in STAGE2_FROZEN})
      ema = dict(ema, **{k: state["ema"][k] for k in STAGE2_FROZEN})
    new = {"params": params, "ema": ema, "opt": opt, **extra}
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = dict(metrics, grad_norm=grad_norm,
                   lr=optim.learning_rate_schedule(c.optim, c.num_steps)(state["step"]))
    if self.gan:
      new_disc, disc_metrics = self._disc_step(state, x, jax.lax.stop_gradient(rec))
      finite &= jnp.isfinite(disc_metrics["disc_loss"])
      new.update(new_disc)
      metrics.update(disc_metrics, disc_factor=factor)
    return train_state.guarded_update(state, new, finite), metrics

  def _disc_step(self, state, x, rec):
    """The discriminator's update (_forward_discriminator + its optimizer), applied from
    discriminator_start on; before, its entries are returned unchanged."""
    loss_cfg = self.config.loss
    ema_real, ema_fake = state["lecam"][0], state["lecam"][1]

    def disc_loss_fn(disc_params):
      loss, new_real, new_fake = titok_losses.stage2_discriminator_loss(
          self._disc(disc_params, x), self._disc(disc_params, rec), ema_real, ema_fake,
          state["step"], discriminator_start=loss_cfg.discriminator_start,
          factor=loss_cfg.discriminator_factor, lecam_weight=loss_cfg.lecam_weight,
          lecam_decay=loss_cfg.lecam_decay)
      return loss, jnp.stack([new_real, new_fake])

    (d_loss, lecam), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(state["disc"])
    d_updates, disc_opt = self.disc_tx.update(d_grads, state["disc_opt"], state["disc"])
    new = {"disc": optax.apply_updates(state["disc"], d_updates), "disc_opt": disc_opt,
           "lecam": lecam}
    active = state["step"] >= loss_cfg.discriminator_start
    new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new,
                       {k: state[k] for k in new})
    return new, {"disc_loss": d_loss, "disc_grad_norm": optim.global_norm(d_grads),
                 "lecam_ema_real": lecam[0], "lecam_ema_fake": lecam[1]}

  def reconstruct(self, params, images, batch_size=None):
    """decode(encode(images)) of host images in [-1, 1] over the training mesh; stage 1: the
    argmax of the proxy-code logits decoded by the proxy MaskGIT-VQGAN."""
    model = self.model(params)
    batch_size = batch_size or self.config.batch_size
    if self.recipe != "stage1":
      return reconstruct.reconstruct(model, images, batch_size, self.mesh)
    proxy = self._frozen_module(self.frozen, "proxy")
    decode = jax.jit(lambda x: jnp.clip(proxy.decode(jnp.argmax(model(x)[0], -1)), -1, 1))
    return sharding.map_batched(decode, (np.asarray(images, np.float32),), batch_size,
                                self.mesh)

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
