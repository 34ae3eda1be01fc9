"""The `digits` feature network: a small CNN classifier for FID-digits and class accuracy.

It plays the role InceptionV3 plays for ImageNet (FID in the
penultimate-layer features of a small classifier). It is trained deterministically on the
digits train split (data/digits.py) served at the requested resolution: fixed seed, a fixed
order of minibatches, a fixed number of Adam steps. The parameters are cached as .npz in the
cache directory, keyed by resolution, so every later run uses the same network.
"""
import functools
import os
import pathlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import traverse_util

from tesserax.backbones.vgg_lpips import headless_distance
from tesserax.core.errors import TesseraxError
from tesserax.core.sharding import map_batched
from tesserax.data.digits import NUM_CLASSES, digits_arrays
from tesserax.data.preprocess import resize_uint8, to_model_range

VERSION = 1  # bump when the architecture or the training recipe changes
FEATURES = 128
SEED = 0
EPOCHS = 20
BATCH = 100
LEARNING_RATE = 2e-3
EVAL_BATCH = 256
HIGHEST = jax.lax.Precision.HIGHEST


class Classifier(nnx.Module):
  """Three 3x3 ReLU convolutions (16, 32, 64 channels; strides 1, 2, 2), flattened into a
  128-unit ReLU layer (the features) and a linear 10-way head."""

  def __init__(self, resolution: int, *, rngs: nnx.Rngs):
    conv = functools.partial(nnx.Conv, kernel_size=(3, 3), precision=HIGHEST, rngs=rngs)
    self.conv1 = conv(1, 16)
    self.conv2 = conv(16, 32, strides=2)
    self.conv3 = conv(32, 64, strides=2)
    size = -(-resolution // 4)  # spatial size after the two stride-2 convolutions
    self.hidden = nnx.Linear(size * size * 64, FEATURES, precision=HIGHEST, rngs=rngs)
    self.head = nnx.Linear(FEATURES, NUM_CLASSES, precision=HIGHEST, rngs=rngs)

  def taps(self, x):
    """The three convolutions' activations, [N, R, R, 16], [N, R/2, R/2, 32], [N, R/4, R/4, 64]."""
    taps = []
    for conv in (self.conv1, self.conv2, self.conv3):
      x = nnx.relu(conv(x))
      taps.append(x)
    return taps

  def feature_map(self, x):
    """The last convolution's activations [N, R / 4, R / 4, 64] (the digits stand-in for a
    foundation model's patch features in the VF loss)."""
    return self.taps(x)[-1]

  def perceptual_distance(self, a, b):
    """Per-image LPIPS form without learned heads over the three convolutions' activations
    (backbones/vgg_lpips.py headless_distance): the offline stand-in for LPIPS."""
    return headless_distance(self.taps(a), self.taps(b))

  def features(self, x):
    x = self.feature_map(x)
    return nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))

  def __call__(self, x):
    return self.head(self.features(x))


class DigitsNet(NamedTuple):
  """A loaded digits network; both functions take float32 NHWC [-1, 1] host images."""
  resolution: int
  features: Callable  # images [N, R, R, 1] -> float32 [N, 128] penultimate activations
  logits: Callable  # images [N, R, R, 1] -> float32 [N, 10]


def digits_images(split: str, resolution: int):
  """(float32 images [N, R, R, 1] in [-1, 1], int32 labels [N]) as the pipeline serves them."""
  images, labels = digits_arrays(split)
  return to_model_range(resize_uint8(images, resolution)), labels


def _train(resolution: int) -> dict:
  """Adam on fixed-order minibatches of the train split; returns the pure-dict params."""
  images, labels = map(jnp.asarray, digits_images("train", resolution))
  graphdef, params = nnx.split(Classifier(resolution, rngs=nnx.Rngs(SEED)))
  optimizer = optax.adam(LEARNING_RATE)
  rng = np.random.RandomState(SEED)
  steps = len(labels) // BATCH
  order = np.stack([rng.permutation(len(labels))[:steps * BATCH] for _ in range(EPOCHS)])
  order = order.reshape(EPOCHS * steps, BATCH)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, index):
    grads = jax.grad(loss_fn)(params, images[index], labels[index])
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  # A Python loop over a jitted step: on XLA:CPU the same steps ran ~20x slower in lax.scan.
  opt_state = optimizer.init(params)
  for index in order:
    params, opt_state = step(params, opt_state, index)
  return nnx.to_pure_dict(params)


def _batched(fn, width, state, resolution, images):
  """Applies a jitted fn(state, x) in fixed-size batches (the last one padded)."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[1:] != (resolution, resolution, 1):
    raise TesseraxError(
        f"digits net expects images [N, {resolution}, {resolution}, 1], got {images.shape}")
  if not len(images):
    return np.zeros((0, width), np.float32)
  return map_batched(functools.partial(fn, state), (images,), EVAL_BATCH, None)


def load_classifier(resolution: int, cache_dir=None) -> Classifier:
  """The trained Classifier for `resolution`, trained on first use and cached.

  cache_dir defaults to $TESSERAX_CACHE, else ~/.cache/tesserax.
  """
  if not (isinstance(resolution, int) and resolution >= 1):
    raise TesseraxError(f"resolution must be a positive integer, got {resolution!r}")
  if cache_dir is None:
    cache_dir = os.environ.get("TESSERAX_CACHE", pathlib.Path.home() / ".cache" / "tesserax")
  path = pathlib.Path(cache_dir) / f"digits_net_v{VERSION}_r{resolution}.npz"
  if path.exists():
    with np.load(path) as f:
      pure = traverse_util.unflatten_dict(dict(f), sep="/")
  else:
    pure = _train(resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
      np.savez(f, **traverse_util.flatten_dict(jax.device_get(pure), sep="/"))
    os.replace(tmp, path)  # atomic, so concurrent processes never read a partial file
  model = nnx.eval_shape(lambda: Classifier(resolution, rngs=nnx.Rngs(SEED)))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, jax.device_put(state))
  return model


def load_digits_net(resolution: int, cache_dir=None) -> DigitsNet:
  """The digits network for `resolution` as host functions (see load_classifier)."""
  graphdef, state = nnx.split(load_classifier(resolution, cache_dir))
  features = jax.jit(lambda state, x: nnx.merge(graphdef, state).features(x))
  logits = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return DigitsNet(
      resolution=resolution,
      features=functools.partial(_batched, features, FEATURES, state, resolution),
      logits=functools.partial(_batched, logits, NUM_CLASSES, state, resolution))
