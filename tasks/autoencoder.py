"""The autoencoder tokenizer task: the autoencoder + GAN step of LDM and VA-VAE.

Each iteration is the official manual optimisation (LightningDiT vavae/ldm/models/
autoencoder.py training_step): one autoencoder step, then one discriminator step on the same
batch and the same (detached) reconstructions, each with its own Adam (VA-VAE's
vavae/configs/f16d32_vfdinov2.yaml: lr 1e-4, betas (0.5, 0.9); `optim` for the autoencoder
and `linear_proj`, `disc_optim` for the discriminator).

Autoencoder loss (LDM ldm/modules/losses/contperceptual.py, LightningDiT vavae/ldm/
modules/losses/contperceptual.py):
  nll + kl_weight KL + d_weight disc_factor g_loss + w_vf vf_loss,
  d_weight = disc_weight ||d nll / dW_dec|| / (||d g_loss / dW_dec|| + 1e-4), clamp [0, 1e4],
  w_vf     = vf_weight   ||d nll / dW_enc|| / (||d vf_loss / dW_enc|| + 1e-4), clamp [0, 1e8],
with W_dec / W_enc the decoder's / encoder's conv_out kernels and disc_factor 0 before
`disc_start` (taming adopt_weight). The four terms come from one forward pass: its vjp is
linear in the cotangent, so the vjp of one-hot cotangents gives each term's gradient (for the
adaptive weights) and the vjp of the weights the total gradient.
Discriminator loss: disc_factor hinge(D(x), D(x_rec)) + lecam_weight LeCam (TiTok), with D's
BatchNorm on batch statistics; its running statistics are updated by every D call, as torch
does in train mode, and kept in the state.

VF alignment (`loss.foundation`): "dinov2" (frozen DINOv2-L patch features, the released
VA-VAE), "digits_net" (the digits classifier's last feature map, the offline stand-in) or ""
(no VF loss, an LDM/SD-VAE-style run). LPIPS (`loss.perceptual_weight` > 0) needs the VGG
weights (`tesserax weights fetch lpips_vgg`).

The state adds to core/train_state.py's: "disc" and "disc_stats" (discriminator params and BatchNorm
statistics), "disc_opt", and "lecam" (EMAs of the mean real and fake logits). At the end of a
run the EMA autoencoder is exported to WORKDIR/tokenizer (tokenizers/tokenizer.py's directory
format), with per-channel latent statistics of posterior samples of training images.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tesserax.core import optim, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.eval.evaluators import eval_images
from tesserax.tokenizers import kl_autoencoder, losses, reconstruct

GAN_MAX_WEIGHT, VF_MAX_WEIGHT = 1e4, 1e8


class Tokenizer(nnx.Module):
  """The trained parameters: the autoencoder, plus VA-VAE's `linear_proj` with a VF loss."""

  def __init__(self, config, feature_dim, *, rngs: nnx.Rngs):
    self.autoencoder = registry.TOKENIZERS.get(config.model.name)(config.model, rngs=rngs)
    if feature_dim:
      self.linear_proj = losses.VFProjection(config.model.embed_dim, feature_dim, rngs=rngs)


def _foundation(name, resolution):
  """(module, features fn(module, images) -> [N, h, w, C]) of the frozen VF target, or None."""
  if name == "dinov2":
    from tesserax.backbones import weights
    return weights.load("dinov2_vitl14"), losses.dinov2_patch_features
  if name == "digits_net":
    from tesserax.backbones.digits_net import load_classifier
    return load_classifier(resolution), lambda net, x: net.feature_map(x)
  if name:
    raise TesseraxError(f"unknown loss.foundation {name!r}; choose dinov2, digits_net or ''")
  return None


def _conv_out_kernel(grads, part):
  return grads["autoencoder"][part]["conv_out"]["kernel"]


def jit_image_step(train_step, state_shardings, mesh, frozen):
  """The compiled step of an image task: `train_step(state, batch, frozen)` with the batch
  ({"image", "label"}) split over the mesh's batch axes, the frozen networks replicated and the
  state donated; returns step(state, batch) -> (state, metrics)."""
  rep = sharding.replicated(mesh)
  batch_sh = {"image": sharding.batch_sharding(mesh, 4), "label": sharding.batch_sharding(mesh, 1)}
  step = jax.jit(train_step, in_shardings=(state_shardings, batch_sh, rep),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))
  return lambda state, batch: step(state, batch, frozen)


def reconstruction_grid(config, reconstruct, params):
  """A tokenizer task's sample grid: 32 images of the training split (odd rows) over their
  reconstructions `reconstruct(params, images)` (even rows), 8 per row."""
  images = eval_images(config.data, config.data.split, 32)
  rec = reconstruct(params, images)
  rows = np.stack([images.reshape(-1, 8, *images.shape[1:]),
                   rec.reshape(-1, 8, *rec.shape[1:])], 1).reshape(-1, *images.shape[1:])
  return rows, 8, max(1, 64 // config.data.resolution)


@registry.TASKS.register("autoencoder")
class AutoencoderTask:
  """The Task (training/task.py) of a KL autoencoder recipe."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    c, loss = config, config.loss
    rep = sharding.replicated(mesh)
    # Frozen networks are arguments of the step (not constants baked into it).
    frozen = {}
    if loss.perceptual_weight:
      from tesserax.backbones import weights
      frozen["lpips"] = weights.load("lpips_vgg")
    foundation = _foundation(loss.foundation, c.model.resolution)
    self.feature_dim = 0
    if foundation:
      frozen["foundation"], self.foundation_features = foundation
      probe = jnp.zeros((1, c.model.resolution, c.model.resolution, c.model.in_channels))
      feature_shape = jax.eval_shape(self.foundation_features, frozen["foundation"], probe).shape
      model = nnx.eval_shape(
          lambda: registry.TOKENIZERS.get(c.model.name)(c.model, rngs=nnx.Rngs(0)))
      if tuple(feature_shape[1:3]) != model.latent_shape[:2]:
        raise TesseraxError(f"loss.foundation={loss.foundation} gives a {feature_shape[1]}x"
                            f"{feature_shape[2]} feature map but the latents are "
                            f"{model.latent_shape[0]}x{model.latent_shape[1]}")
      self.feature_dim = feature_shape[-1]
    self.frozen_graphdefs, frozen_state = {}, {}
    for name, module in frozen.items():
      self.frozen_graphdefs[name], frozen_state[name] = nnx.split(module)
    self.frozen = jax.device_put(frozen_state, rep)

    self.graphdef, _ = nnx.split(nnx.eval_shape(self._build))
    self.disc_graphdef, _, _ = nnx.split(nnx.eval_shape(self._build_disc), nnx.Param, ...)
    self.tx = optim.make_optimizer(c.optim, c.num_steps)
    self.disc_tx = optim.make_optimizer(c.disc_optim, c.num_steps)
    abstract_state = jax.eval_shape(self._init)
    self.state_shardings = jax.tree.map(lambda _: rep, abstract_state)
    self.abstract_state = train_state.shard_abstract(abstract_state, self.state_shardings)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.train_step = jit_image_step(self._train_step, self.state_shardings, mesh,
                                     self.frozen)
    self.predict = {"reconstruct": self.reconstruct, "encode": self.encode}

  def _build(self):
    return Tokenizer(self.config, self.feature_dim, rngs=nnx.Rngs(self.config.seed))

  def _build_disc(self):
    d = self.config.disc
    return losses.NLayerDiscriminator(self.config.model.in_channels, d.ndf, d.n_layers,
                                      rngs=nnx.Rngs(self.config.seed + 1))

  def _init(self):
    params = nnx.to_pure_dict(nnx.state(self._build(), nnx.Param))
    _, disc, disc_stats = nnx.split(self._build_disc(), nnx.Param, ...)
    disc, disc_stats = nnx.to_pure_dict(disc), nnx.to_pure_dict(disc_stats)
    return train_state.new_state(params, self.tx, self.config.seed, disc=disc,
                                 disc_stats=disc_stats, disc_opt=self.disc_tx.init(disc),
                                 lecam=jnp.zeros(2, jnp.float32))

  def _disc_logits(self, disc_params, disc_stats, images):
    """D(images) in train mode, and the BatchNorm statistics it leaves."""
    disc = nnx.merge(self.disc_graphdef, disc_params, disc_stats)
    logits = disc(images, train=True)
    return logits, nnx.to_pure_dict(nnx.state(disc, nnx.BatchStat))

  def _train_step(self, state, batch, frozen):
    c, loss_cfg = self.config, self.config.loss
    x = batch["image"]
    key = train_state.step_key(state)
    disc_factor = jnp.where(state["step"] >= loss_cfg.disc_start, loss_cfg.disc_factor, 0.0)
    module = lambda name: nnx.merge(self.frozen_graphdefs[name], frozen[name])
    if "foundation" in frozen:
      target = jax.lax.stop_gradient(self.foundation_features(module("foundation"), x))

    def terms(params):
      model = nnx.merge(self.graphdef, params)
      mean, logvar = model.autoencoder.posterior(x)
      z = kl_autoencoder.sample(mean, logvar, key)
      rec = model.autoencoder.decode(z)
      perceptual = (module("lpips")(x, rec) if "lpips" in frozen
                    else jnp.zeros(x.shape[0], x.dtype))
      logits_fake, disc_stats = self._disc_logits(state["disc"], state["disc_stats"], rec)
      out = {"nll": losses.nll_loss(x, rec, perceptual, loss_cfg.perceptual_weight),
             "kl": losses.kl_loss(mean, logvar), "g_loss": losses.generator_loss(logits_fake)}
      if "foundation" in frozen:
        out["vf_loss"] = losses.vf_loss(
            model.linear_proj(z), target, loss_cfg.cos_margin, loss_cfg.distmat_margin,
            loss_cfg.cos_weight, loss_cfg.distmat_weight)
      return out, (rec, disc_stats)

    values, vjp, (rec, disc_stats) = jax.vjp(terms, state["params"], has_aux=True)
    grad_of = lambda name: vjp({k: jnp.asarray(k == name, v.dtype) for k, v in values.items()})[0]
    grad_nll = grad_of("nll")
    d_weight = loss_cfg.disc_weight * losses.adaptive_weight(
        _conv_out_kernel(grad_nll, "decoder"), _conv_out_kernel(grad_of("g_loss"), "decoder"),
        GAN_MAX_WEIGHT)
    weights = {"nll": 1.0, "kl": loss_cfg.kl_weight, "g_loss": d_weight * disc_factor}
    if "vf_loss" in values:
      weights["vf_loss"] = loss_cfg.vf_weight * losses.adaptive_weight(
          _conv_out_kernel(grad_nll, "encoder"), _conv_out_kernel(grad_of("vf_loss"), "encoder"),
          VF_MAX_WEIGHT)
    weights = {k: jnp.asarray(w, values[k].dtype) for k, w in weights.items()}
    ae_loss = sum(weights[k] * values[k] for k in values)
    grads = vjp(weights)[0]
    updates, opt = self.tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    rec = jax.lax.stop_gradient(rec)

    def disc_loss_fn(disc_params):
      logits_real, stats = self._disc_logits(disc_params, disc_stats, x)
      logits_fake, stats = self._disc_logits(disc_params, stats, rec)
      loss = disc_factor * losses.hinge_d_loss(logits_real, logits_fake)
      if loss_cfg.lecam_weight:
        loss += loss_cfg.lecam_weight * losses.lecam(logits_real, logits_fake, *state["lecam"])
      return loss, (stats, jnp.mean(logits_real), jnp.mean(logits_fake))

    (d_loss, (new_stats, real_mean, fake_mean)), d_grads = jax.value_and_grad(
        disc_loss_fn, has_aux=True)(state["disc"])
    d_updates, disc_opt = self.disc_tx.update(d_grads, state["disc_opt"], state["disc"])
    disc = optax.apply_updates(state["disc"], d_updates)
    lecam_ema = state["lecam"] * loss_cfg.lecam_decay + jnp.stack(
        [real_mean, fake_mean]) * (1.0 - loss_cfg.lecam_decay)

    grad_norm, d_grad_norm = optim.global_norm(grads), optim.global_norm(d_grads)
    finite = jnp.all(jnp.isfinite(jnp.array([ae_loss, d_loss, grad_norm, d_grad_norm])))
    new_state = train_state.guarded_update(state, {
        "params": params, "ema": optim.ema_update(state["ema"], params, c.ema_decay),
        "opt": opt, "disc": disc, "disc_stats": new_stats, "disc_opt": disc_opt,
        "lecam": lecam_ema}, finite)
    metrics = dict(values, loss=ae_loss, disc_loss=d_loss, d_weight=d_weight,
                   logits_real=real_mean, logits_fake=fake_mean, grad_norm=grad_norm,
                   disc_grad_norm=d_grad_norm, disc_factor=disc_factor,
                   lr=optim.learning_rate_schedule(c.optim, c.num_steps)(state["step"]))
    if "vf_loss" in weights:
      metrics["vf_weight"] = weights["vf_loss"]
    return new_state, metrics

  # ------------------------------------------------------------------ predictions and export

  def reconstruct(self, params, images, batch_size=None):
    """Posterior-mean reconstructions (tokenizers/reconstruct.py) of host images in [-1, 1]
    by the autoencoder at `params`, over the training mesh."""
    model = nnx.merge(self.graphdef, params).autoencoder
    return reconstruct.reconstruct(model, images, batch_size or self.config.batch_size,
                                   self.mesh)

  def encode(self, params, images, batch_size=None):
    """Posterior means of host images in [-1, 1], over the training mesh."""
    model = nnx.merge(self.graphdef, params).autoencoder
    encode = jax.jit(lambda x: model.encode(x))
    return sharding.map_batched(encode, (np.asarray(images, np.float32),),
                                batch_size or self.config.batch_size, self.mesh)

  def sample_grid(self, params):
    return reconstruction_grid(self.config, self.reconstruct, params)

  def export(self, state, workdir, log=print):
    """WORKDIR/tokenizer: the EMA autoencoder and per-channel statistics of posterior samples
    of the first export.num_images training images (batches of 256, batch i drawing its
    noise from PRNGKey(i))."""
    from tesserax.tokenizers import tokenizer
    model = nnx.merge(self.graphdef, state["ema"]).autoencoder
    images = eval_images(self.config.data, self.config.data.split,
                         self.config.export.num_images)
    encode = jax.jit(lambda x, key: kl_autoencoder.sample(*model.posterior(x), key))
    latents = np.concatenate([
        np.asarray(encode(images[i:i + 256], jax.random.PRNGKey(i)))
        for i in range(0, len(images), 256)]).astype(np.float64)
    stats = {"mean": latents.mean((0, 1, 2)).astype(np.float32),
             "std": latents.std((0, 1, 2)).astype(np.float32)}
    if jax.process_index() == 0:
      directory = os.path.join(workdir, "tokenizer")
      tokenizer.save(directory, self.config.model.name, self.config.model.name,
                     self.config.model, tokenizer.flat_params(model), stats)
      log(f"exported the EMA tokenizer to {directory}")
