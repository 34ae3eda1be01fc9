"""The FlexTok tokenizer task: end-to-end training of a FlexTok (tokenizers/flextok.py), encoder,
FSQ and rectified-flow decoder together, as the paper trains it (Bachmann et al. 2025, §3;
apple/ml-flextok releases no training code):

  loss = mean (v(x_t, t | z_{<keep_k}) - (eps - x0))^2          (rectified flow, t = sigmoid(N(0, 1)))
       + loss.repa_weight * -cos(projector(h_l), f(x))           (REPA on decoder block l)

per example: keep_k from `loss.keep_k` (uniform in 1..R, pow2, uniform_pow2), the registers past
it replaced by the mask token (nested dropout); the null condition with probability
`loss.null_prob` (for guidance at decoding); FSQ rounding skipped with probability
`loss.skip_rounding_prob` (drop_quant_p). REPA's frozen target `loss.foundation` is "dinov2"
(DINOv2-L patch features, `tesserax weights fetch dinov2_vitl14`), "digits_net" (the digits
classifier's last feature map, the offline stand-in) or "" (off); its feature grid must equal
the decoder's patch grid. The projector (`RepaProjector`, width `loss.repa_hidden`) trains with
the model and is not exported.

The train state is core/train_state.py's with params {"tokenizer", "projector"}; AdamW decays
the matrices only (not the registers, position embeddings, mask token or null condition).
Training runs on pixels (`model.vae` None). At the end of a run the EMA tokenizer is exported to
WORKDIR/tokenizer. predict["reconstruct"](params, images, batch_size=None, settings=None)
decodes from the first `settings["tokens"]` tokens (default all) with the decoder's steps and
guidance (tokenizers/reconstruct.py decode_settings).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tesserax.core import optim, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.tasks import autoencoder
from tesserax.tokenizers import flextok, reconstruct

# Parameters AdamW leaves undecayed: learned tokens and embeddings (and every vector).
NO_DECAY_NAMES = ("registers", "registers_posemb", "mask_token", "nullcond")
GRID_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def decays(params) -> dict:
  def decayed(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    return leaf.ndim >= 2 and not any(name in NO_DECAY_NAMES for name in names)
  return jax.tree_util.tree_map_with_path(decayed, params)


class Trainee(nnx.Module):
  """What trains: the FlexTok and, with REPA, its projector."""

  def __init__(self, config, feature_dim, *, rngs: nnx.Rngs):
    self.tokenizer = flextok.FlexTok(config.model, rngs=rngs)
    if feature_dim:
      self.projector = flextok.RepaProjector(config.model.decoder_dim, feature_dim,
                                             config.loss.repa_hidden, rngs=rngs)


@registry.TASKS.register("flextok")
class FlexTokTask:
  """The Task (training/task.py) of a FlexTok recipe."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    c, loss = config, config.loss
    if c.model.get("vae") is not None:
      raise TesseraxError("FlexTok training runs on pixels: set model.vae to None (latent "
                          "FlexToks are converted, not trained, here)")
    if loss.keep_k not in flextok.KEEP_K_MODES:
      raise TesseraxError(f"unknown loss.keep_k {loss.keep_k!r}; choose from "
                          f"{', '.join(flextok.KEEP_K_MODES)}")
    rep = sharding.replicated(mesh)
    abstract_model = nnx.eval_shape(lambda: flextok.build(c.model, c.seed))
    self.grid = tuple(n // c.model.patch_size for n in abstract_model.latent_grid[:2])
    self.frozen_graphdef, frozen, feature_dim = None, {}, 0
    foundation = autoencoder._foundation(loss.foundation, c.model.resolution)
    if foundation and loss.repa_weight:
      module, self.foundation_features = foundation
      probe = jnp.zeros((1, c.model.resolution, c.model.resolution, c.model.channels))
      shape = jax.eval_shape(self._targets_of, module, probe).shape
      if tuple(shape[1:3]) != self.grid:
        raise TesseraxError(f"loss.foundation={loss.foundation} gives a {shape[1]}x{shape[2]} "
                            f"feature map but the decoder's patch grid is {self.grid[0]}x"
                            f"{self.grid[1]}")
      feature_dim = shape[-1]
      self.frozen_graphdef, frozen = nnx.split(module)
    self.frozen = jax.device_put(frozen, rep)
    self.feature_dim = feature_dim
    abstract = nnx.eval_shape(self._build)
    self.graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    self.buffers = jax.device_put(nnx.to_pure_dict(nnx.state(self._build(),
                                                             nnx.Not(nnx.Param))), rep)
    self.tx = optim.make_optimizer(c.optim, c.num_steps, mask=decays)
    names = sharding.logical_names(abstract_params)
    param_sh = sharding.param_shardings(nnx.to_pure_dict(abstract_params), names, mesh)
    abstract_state = jax.eval_shape(self._init)
    self.state_shardings = train_state.state_shardings(abstract_state, param_sh, self.tx, mesh)
    self.abstract_state = train_state.shard_abstract(abstract_state, self.state_shardings)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.train_step = autoencoder.jit_image_step(self._train_step, self.state_shardings, mesh,
                                                 self.frozen)
    self.predict = {"reconstruct": self.reconstruct, "encode": self.encode,
                    "decode": self.decode}

  def _build(self):
    return Trainee(self.config, self.feature_dim, rngs=nnx.Rngs(self.config.seed))

  def _targets_of(self, module, images):
    """REPA targets [B, h, w, D'] of images in [-1, 1] (grayscale to the frozen net)."""
    if self.config.loss.foundation == "digits_net":
      images = jnp.mean(images, axis=-1, keepdims=True)
    return self.foundation_features(module, images)

  def model(self, params):
    """The FlexTok network of the `tokenizer` params."""
    trainee = nnx.merge(self.graphdef, params, self.buffers)
    return trainee.tokenizer

  def _init(self):
    return train_state.new_state(nnx.to_pure_dict(nnx.state(self._build(), nnx.Param)),
                                 self.tx, self.config.seed)

  def _train_step(self, state, batch, frozen):
    c, loss_cfg = self.config, self.config.loss
    x = batch["image"]
    key = train_state.step_key(state)
    targets = None
    if self.frozen_graphdef is not None:
      net = nnx.merge(self.frozen_graphdef, frozen)
      targets = jax.lax.stop_gradient(self._targets_of(net, x))
      targets = targets.reshape(targets.shape[0], -1, targets.shape[-1])

    def loss_fn(params):
      trainee = nnx.merge(self.graphdef, params, self.buffers)
      loss, metrics = flextok.training_loss(
          trainee.tokenizer, key, x, keep_k_mode=loss_cfg.keep_k, null_prob=loss_cfg.null_prob,
          skip_rounding_prob=loss_cfg.skip_rounding_prob,
          projector=getattr(trainee, "projector", None), repa_targets=targets,
          repa_layer=loss_cfg.repa_layer, repa_weight=loss_cfg.repa_weight)
      return loss, dict(metrics, loss=loss)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_state, step_metrics = train_state.optimizer_step(state, loss, grads, self.tx, c)
    return new_state, dict(metrics, **step_metrics)

  def reconstruct(self, params, images, batch_size=None, settings=None):
    """decode(encode(images)) of host images in [-1, 1] over the training mesh, from the first
    settings["tokens"] tokens (reconstruct.decode_settings; default all, the config's decoder
    steps and guidance)."""
    return reconstruct.reconstruct(self.model(params), images,
                                   batch_size or self.config.batch_size, self.mesh, settings)

  def encode(self, params, images, batch_size=None):
    """Token ids int32 [N, R] of host images in [-1, 1]."""
    model = self.model(params)
    return sharding.map_batched(jax.jit(model.encode), (np.asarray(images, np.float32),),
                                batch_size or self.config.batch_size, self.mesh)

  def decode(self, params, ids, batch_size=None, settings=None):
    """Images of host token ids [N, K] (the first K of an image's tokens)."""
    return reconstruct.decode(self.model(params), ids, batch_size or self.config.batch_size,
                              self.mesh, settings)

  def sample_grid(self, params):
    """8 training images (top row) over their reconstructions from 1, 2, 4, ... tokens."""
    from tesserax.eval.evaluators import eval_images
    c = self.config
    images = eval_images(c.data, c.data.split, 8)
    ks = [k for k in GRID_KS if k <= c.model.num_registers]
    rows = [images] + [self.reconstruct(params, images, settings={"tokens": k}) for k in ks]
    return np.concatenate(rows), 8, max(1, 64 // c.data.resolution)

  def export(self, state, workdir, log=print):
    """WORKDIR/tokenizer: the EMA FlexTok (without the REPA projector)."""
    from tesserax.tokenizers import tokenizer
    if jax.process_index() == 0:
      directory = os.path.join(workdir, "tokenizer")
      tokenizer.save(directory, "flextok", "flextok", self.config.model,
                     tokenizer.flat_params(self.model(state["ema"])))
      log(f"exported the EMA tokenizer to {directory}")
