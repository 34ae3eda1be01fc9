"""The tokenizer interface, and the tokenizer directory: written by `save`, read by `load`.

A tokenizer network is an nnx.Module registered in core/registry.py TOKENIZERS under its family
name ("kl_autoencoder"), built as `Network(model_config, rngs=rngs)`. It gives:

  encode(images, keys=None)   images float32 [B, R, R, C] in [-1, 1] -> latents (float) or token
      ids (int32) [B, *latent_shape]. keys None: the deterministic encoding (a KL posterior's
      mean, a quantizer's nearest codes); keys [B], one PRNG key per example: the stochastic one
      (a KL posterior sample mean + std * normal(keys[i]), which is what the feature extraction
      of LightningDiT and fast-DiT, extract_features.py, stores).
  decode(latents)             latents or token ids -> images [B, R, R, C], nominally in [-1, 1]
  resolution, channels        the side and channels of the images it takes
  latent_shape, latent_dtype  one example's latents: shape, numpy dtype (float32 or int32)
  is_discrete, codebook_size  token ids in [0, codebook_size); codebook_size 0 when continuous

Caches (tokenizers/cache_encoder.py), reconstructions (tokenizers/reconstruct.py) and the
commands that decode samples use nothing else of a tokenizer.

A tokenizer directory holds
  config.json       {"kind": the converter kind ("vavae-f16d32") or, for a trained tokenizer,
                    its family; "tokenizer": the registry family; "model": the network config}.
                    Directories written before the family was recorded lack "tokenizer"; they
                    hold a KL autoencoder.
  latent_stats.npz  {"mean", "std"} float32 [latent channels] of a continuous tokenizer: latents
                    are normalised as (z - mean) / std (absent for discrete tokenizers)
  params.npz        the parameters under flat dotted keys ("encoder.conv_in.kernel"), put in
                    place last: its presence marks a complete directory
Malformed files are refused in one line naming the file.
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tesserax.backbones import weights
from tesserax.core import registry, sharding
from tesserax.core.errors import TesseraxError
from tesserax.core.files import atomic_output, one_line, read_npz

CONFIG_FILE = "config.json"
STATS_FILE = "latent_stats.npz"
PARAMS_FILE = "params.npz"
_UNNAMED_FAMILY = "kl_autoencoder"  # the family of directories without "tokenizer"


def check_images(images, resolution, channels=3):
  """Refuses images that are not [N, resolution, resolution, channels], or, where the values are
  concrete, outside [-1, 1] (uint8 or [0, 1] images passed by mistake)."""
  if images.ndim != 4 or tuple(images.shape[1:]) != (resolution, resolution, channels):
    raise TesseraxError(f"images of shape {tuple(images.shape)}; this tokenizer takes "
                        f"[N, {resolution}, {resolution}, {channels}]")
  if not isinstance(images, jax.core.Tracer):
    values = np.asarray(images)  # concrete: checked on the host, outside any trace
    lo, hi = float(values.min()), float(values.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
      raise TesseraxError(f"image values in [{lo:.3g}, {hi:.3g}]; tokenizers take floats in "
                          "[-1, 1] (x / 127.5 - 1 for uint8)")


def flat_params(model) -> dict:
  """The flat {"encoder.conv_in.kernel": array} parameters of a network, on the host."""
  return {".".join(map(str, path)): np.asarray(x.get_value())
          for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save(directory, kind: str, family: str, config, params: dict, stats=None) -> str:
  """Writes a tokenizer directory: `config` the network's ConfigDict, `params` flat (see
  `flat_params`), `stats` {"mean", "std"} [latent channels] (None for a discrete tokenizer).

  Every file is written under a temporary name first, so a failure leaves the directory as it
  was. Then an old params.npz is removed and the new files are renamed into place, params.npz
  last: a process killed in between leaves a directory without params.npz, which is refused,
  never old parameters with new statistics. Returns the absolute directory."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, PARAMS_FILE)
  with contextlib.ExitStack() as renames:  # renamed on exit, last in first out
    names = [PARAMS_FILE, CONFIG_FILE] + ([STATS_FILE] if stats is not None else [])
    tmp = {name: renames.enter_context(atomic_output(os.path.join(directory, name)))
           for name in names}
    with open(tmp[PARAMS_FILE], "wb") as f:
      np.savez(f, **params)
    with open(tmp[CONFIG_FILE], "w") as f:
      json.dump({"kind": kind, "tokenizer": family, "model": config.to_dict()}, f, indent=2)
    if stats is not None:
      with open(tmp[STATS_FILE], "wb") as f:
        np.savez(f, **{k: np.asarray(stats[k], np.float32) for k in ("mean", "std")})
    if os.path.exists(path):
      os.remove(path)
  return directory


def read_config(directory) -> dict:
  """{"kind", "tokenizer" (the family), "model" (a ConfigDict)} of a tokenizer directory."""
  if not os.path.isdir(directory):
    raise TesseraxError(f"tokenizer directory not found: {directory}")
  if not all(os.path.exists(os.path.join(directory, f)) for f in (CONFIG_FILE, PARAMS_FILE)):
    raise TesseraxError(f"{directory} is not a tokenizer directory (no {PARAMS_FILE}/"
                        f"{CONFIG_FILE})")
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise TesseraxError(f"{path} is not JSON ({one_line(e)})") from None
  if not (isinstance(meta, dict) and isinstance(meta.get("kind"), str)
          and isinstance(meta.get("model"), dict)):
    raise TesseraxError(f"{path} is not a tokenizer config: it needs \"kind\" (a string) and "
                        "\"model\" (the network config)")
  return {"kind": meta["kind"], "tokenizer": meta.get("tokenizer", _UNNAMED_FAMILY),
          "model": ml_collections.ConfigDict(meta["model"])}


@dataclasses.dataclass
class Tokenizer:
  """A loaded tokenizer directory: the network (the interface above), its latent statistics
  (None for a discrete tokenizer), what it is, and the sha256 of its params.npz (caches record
  which weights encoded them)."""
  model: nnx.Module
  stats: dict | None
  kind: str
  family: str
  config: ml_collections.ConfigDict
  directory: str
  digest: str

  def normalize(self, latents):
    """(z - mean) / std; token ids unchanged."""
    if self.stats is None:
      return latents
    return (latents - self.stats["mean"]) / self.stats["std"]

  def denormalize(self, latents):
    """z * std + mean (host or traced latents); token ids unchanged."""
    return _denormalized(latents, self.stats)

  @functools.cached_property
  def _on_devices(self):
    """(mesh, graphdef, state replicated over the local devices)."""
    mesh = sharding.local_mesh()
    graphdef, state = nnx.split(self.model)
    return mesh, graphdef, jax.device_put(state, sharding.replicated(mesh))

  def decode_normalized(self, latents, batch_size: int = 64, image_channels=None) -> np.ndarray:
    """Host float32 images [N, R, R, C] clipped to [-1, 1] of host normalised latents (or token
    ids) [N, *latent_shape]: denormalised and decoded in jitted batches of `batch_size`
    (rounded up to a multiple of the local devices, the last one padded) split over this
    process's devices. C is `image_channels` (default the network's); 1 for an RGB network
    (grayscale images were tiled in) gives the mean of the decoded channels."""
    model = self.model
    latents = np.asarray(latents, model.latent_dtype)
    if latents.shape[1:] != tuple(model.latent_shape):
      raise TesseraxError(f"latents of shape {latents.shape[1:]}; the tokenizer decodes "
                          f"{tuple(model.latent_shape)}")
    gray = image_channels not in (None, model.channels)
    mesh, graphdef, state = self._on_devices
    return sharding.map_batched(
        lambda z: _decode_batch(graphdef, gray, state, z, self.stats), (latents,), batch_size,
        mesh)


def _denormalized(latents, stats):
  return latents if stats is None else latents * stats["std"] + stats["mean"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode_batch(graphdef, gray, state, latents, stats):
  images = nnx.merge(graphdef, state).decode(_denormalized(latents, stats))
  images = jnp.clip(images, -1.0, 1.0)
  return images.mean(-1, keepdims=True) if gray else images


def load(directory) -> Tokenizer:
  """The Tokenizer of a directory written by `save` (or by the converters before the family
  was recorded)."""
  directory = os.path.abspath(directory)
  meta = read_config(directory)
  network = registry.TOKENIZERS.get(meta["tokenizer"])
  path = os.path.join(directory, PARAMS_FILE)
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  params = read_npz(path, "tokenizer parameters")
  try:
    model = weights.with_params(lambda: network(meta["model"], rngs=nnx.Rngs(0)), params,
                                source=path)
  except (AttributeError, KeyError, TypeError) as e:  # a key or value the network lacks
    raise TesseraxError(f"{os.path.join(directory, CONFIG_FILE)}: its model config does not "
                        f"build a {meta['tokenizer']} network ({one_line(e)})") from None
  stats = None
  if not model.is_discrete:
    stats_path = os.path.join(directory, STATS_FILE)
    if not os.path.exists(stats_path):
      raise TesseraxError(f"{directory} holds a continuous tokenizer without {STATS_FILE}, the "
                          "latent statistics (mean, std per channel)")
    stats = _read_stats(stats_path, model.latent_shape[-1])
  return Tokenizer(model, stats, meta["kind"], meta["tokenizer"], meta["model"], directory,
                   digest)


def _read_stats(path, channels) -> dict:
  """{"mean", "std"} float32 [channels] of a latent_stats.npz, checked."""
  def mean_std(names):
    missing = [k for k in ("mean", "std") if k not in names]
    if missing:
      raise TesseraxError(f"{path} lacks {' and '.join(missing)} (it has {', '.join(names)})")
    return ("mean", "std")

  stats = read_npz(path, "latent statistics", mean_std)
  for key, value in stats.items():
    if value.shape != (channels,) or not np.issubdtype(value.dtype, np.floating):
      raise TesseraxError(f"{path}: {key} is {value.dtype} {value.shape}; expected floats "
                          f"[{channels}], one per latent channel")
  if not (np.all(np.isfinite(stats["mean"])) and np.all(stats["std"] > 0)):
    raise TesseraxError(f"{path}: mean must be finite and std positive")
  return stats
