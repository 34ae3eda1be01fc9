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

Pixels or latents: without `model.vae` the encoder patches the images. With `model.vae` (a KL
autoencoder config, tokenizers/kl_autoencoder.py) FlexTok runs over the latents of that frozen
VAE times `model.vae_scaling_factor`, as the released models do over their SDXL-style VAE
(ml-flextok vae_wrapper.py, `sample_posterior`): its parameters come from `loss.vae_dir`, a
tokenizer directory holding a KL autoencoder (`tesserax train --config digits_kl` writes
WORKDIR/tokenizer, `tesserax convert --kind flextok-vae` a released VAE, whose latent_stats
std is 1 / scaling_factor). A directory that is missing, holds another family or whose model
config differs from `model.vae` (any key but dtype) is refused in one line. The VAE is not
trained: its parameters stay out of the train state (no gradient, optimizer moments, weight
decay or EMA), are read again from `loss.vae_dir` when a run resumes and go to the step as a
frozen argument. Training encodes a posterior sample, example i's noise normal(split(k_vae,
B)[i]) with (k_vae, k_loss) = split(step key) and k_loss the key of flextok.training_loss;
encode, reconstruct and the export use the posterior mean.

The train state is core/train_state.py's with params {"tokenizer", "projector"} (the tokenizer
without its VAE); AdamW decays the matrices only (not the registers, position embeddings, mask
token or null condition). At the end of a run the EMA tokenizer, with the VAE, is exported to
WORKDIR/tokenizer. predict["reconstruct"](params, images, batch_size=None, settings=None)
decodes from the first `settings["tokens"]` tokens (default all) with the decoder's steps and
guidance (tokenizers/reconstruct.py decode_settings).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tesserax.core import optim, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.tasks import autoencoder
from tesserax.tokenizers import flextok, reconstruct, tokenizer

# Parameters AdamW leaves undecayed: learned tokens and embeddings (and every vector).
NO_DECAY_NAMES = ("registers", "registers_posemb", "mask_token", "nullcond")
GRID_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The optimizer's parameters and the frozen VAE's.
TRAINED = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vae")))
VAE = nnx.All(nnx.Param, nnx.PathContains("vae"))


def decays(params) -> dict:
  def decayed(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    return leaf.ndim >= 2 and not any(name in NO_DECAY_NAMES for name in names)
  return jax.tree_util.tree_map_with_path(decayed, params)


class Trainee(nnx.Module):
  """What trains: the FlexTok (its VAE frozen) and, with REPA, its projector."""

  def __init__(self, model_config, feature_dim, repa_hidden, *, rngs: nnx.Rngs):
    self.tokenizer = flextok.FlexTok(model_config, rngs=rngs)
    if feature_dim:
      self.projector = flextok.RepaProjector(model_config.decoder_dim, feature_dim, repa_hidden,
                                             rngs=rngs)


def _plain(value):
  """A config value as its JSON reads back (tuples as lists)."""
  return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def load_vae(directory, vae_config) -> dict:
  """The pure-dict parameters of the KL autoencoder in tokenizer directory `directory`, refused
  in one line unless it is one whose model config equals `vae_config` in every key but dtype."""
  if not directory:
    raise TesseraxError("model.vae is set but loss.vae_dir is empty: give the tokenizer "
                        "directory of the frozen KL autoencoder (e.g. WORKDIR/tokenizer of "
                        "`tesserax train --config digits_kl`)")
  try:
    meta = tokenizer.read_config(directory)
  except TesseraxError as e:
    raise TesseraxError(f"loss.vae_dir: {e}") from None
  if meta["tokenizer"] != "kl_autoencoder":
    raise TesseraxError(f"loss.vae_dir={directory} holds a {meta['tokenizer']} tokenizer, not "
                        "a KL autoencoder")
  for key in vae_config:
    want = _plain(vae_config[key])
    got = _plain(meta["model"][key]) if key in meta["model"] else "missing"
    if key != "dtype" and got != want:
      raise TesseraxError(f"loss.vae_dir={directory} holds a KL autoencoder with {key}={got!r}, "
                          f"but model.vae.{key}={want!r}")
  return nnx.to_pure_dict(nnx.state(tokenizer.load(directory).model, nnx.Param))


@registry.TASKS.register("flextok")
class FlexTokTask:
  """The Task (training/task.py) of a FlexTok recipe."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    c, loss = config, config.loss
    if loss.keep_k not in flextok.KEEP_K_MODES:
      raise TesseraxError(f"unknown loss.keep_k {loss.keep_k!r}; choose from "
                          f"{', '.join(flextok.KEEP_K_MODES)}")
    vae = c.model.get("vae")
    if vae is None and loss.get("vae_dir"):
      raise TesseraxError(f"loss.vae_dir={loss.vae_dir} is set but model.vae is None (a pixel "
                          "FlexTok): set model.vae to the directory's KL autoencoder config")
    if vae is not None and (vae.resolution, vae.in_channels) != (c.model.resolution,
                                                                c.model.channels):
      raise TesseraxError(f"model.vae takes {vae.resolution}x{vae.resolution}x{vae.in_channels}"
                          f" images but model.resolution={c.model.resolution}, "
                          f"model.channels={c.model.channels}")
    rep = sharding.replicated(mesh)
    frozen = {}
    if vae is not None:
      frozen["vae"] = {"tokenizer": {"vae": load_vae(loss.get("vae_dir", ""), vae)}}
    abstract_model = nnx.eval_shape(lambda: flextok.build(c.model, c.seed))
    self.grid = tuple(n // c.model.patch_size for n in abstract_model.latent_grid[:2])
    self.frozen_graphdef, feature_dim = None, 0
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
      self.frozen_graphdef, frozen["foundation"] = nnx.split(module)
    self.frozen = jax.device_put(frozen, rep)
    self.vae = self.frozen.get("vae", {})
    self.feature_dim = feature_dim
    self.graphdef, abstract_params, _, _ = nnx.split(nnx.eval_shape(self._build), TRAINED, VAE,
                                                     ...)
    self.buffers = jax.device_put(jax.jit(lambda: nnx.to_pure_dict(
        nnx.state(self._build(), nnx.Not(nnx.Param))))(), rep)
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
    c = self.config
    return Trainee(c.model, self.feature_dim, c.loss.repa_hidden, rngs=nnx.Rngs(c.seed))

  def _targets_of(self, module, images):
    """REPA targets [B, h, w, D'] of images in [-1, 1] (grayscale to the frozen net)."""
    if self.config.loss.foundation == "digits_net":
      images = jnp.mean(images, axis=-1, keepdims=True)
    return self.foundation_features(module, images)

  def _trainee(self, params, vae):
    return nnx.merge(self.graphdef, params, vae, self.buffers)

  def model(self, params):
    """The FlexTok network of the `tokenizer` params, with the frozen VAE."""
    return self._trainee(params, self.vae).tokenizer

  def _init(self):
    return train_state.new_state(nnx.to_pure_dict(nnx.state(self._build(), TRAINED)), self.tx,
                                 self.config.seed)

  def _train_step(self, state, batch, frozen):
    c, loss_cfg = self.config, self.config.loss
    x = batch["image"]
    key = train_state.step_key(state)
    targets = None
    if self.frozen_graphdef is not None:
      net = nnx.merge(self.frozen_graphdef, frozen["foundation"])
      targets = jax.lax.stop_gradient(self._targets_of(net, x))
      targets = targets.reshape(targets.shape[0], -1, targets.shape[-1])
    latent_keys = None
    if "vae" in frozen:  # the loss encodes posterior samples of the frozen VAE
      vae_key, key = jax.random.split(key)
      latent_keys = jax.random.split(vae_key, x.shape[0])

    def loss_fn(params):
      trainee = self._trainee(params, frozen.get("vae", {}))
      loss, metrics = flextok.training_loss(
          trainee.tokenizer, key, x, latent_keys=latent_keys, keep_k_mode=loss_cfg.keep_k,
          null_prob=loss_cfg.null_prob, skip_rounding_prob=loss_cfg.skip_rounding_prob,
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
    """WORKDIR/tokenizer: the EMA FlexTok with its VAE (without the REPA projector)."""
    if jax.process_index() == 0:
      directory = os.path.join(workdir, "tokenizer")
      tokenizer.save(directory, "flextok", "flextok", self.config.model,
                     tokenizer.flat_params(self.model(state["ema"])))
      log(f"exported the EMA tokenizer to {directory}")
