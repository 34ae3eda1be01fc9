"""LPIPS v0.1 with the VGG16 backbone (richzhang/PerceptualSimilarity, lpips 0.1.4).

lpips/lpips.py: inputs in [-1, 1]; ScalingLayer (x - shift) / scale; torchvision VGG16
`features` tapped at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (features[0:4], [4:9],
[9:16], [16:23], [23:30]); each tap unit-normalised over channels, f / (||f||_2 + 1e-10);
squared difference; the v0.1 linear head `lin{k}` (a bias-free 1x1 convolution to one
channel); spatial mean; sum over the five layers. `headless_distance` is that form without
the learned heads (each channel weighted 1), for networks that have none (the digits net).
"""
import jax
import jax.numpy as jnp
from flax import nnx

HIGHEST = jax.lax.Precision.HIGHEST
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# VGG16 `features` as (output channels of each 3x3 conv) per stage; a 2x2 max pool separates
# stages and the last ReLU of each stage is an LPIPS tap.
STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Index of each conv in torchvision's vgg16().features (ReLUs and pools take the others).
TORCH_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def unit_normalize(f):
  """f / (||f||_2 + 1e-10) over channels (lpips normalize_tensor)."""
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)


def headless_distance(taps_a, taps_b):
  """Per-image LPIPS form without learned heads: for each pair of feature maps [N, ..., C],
  the squared difference of the unit-normalised features summed over channels and averaged
  over positions; summed over the maps."""
  total = 0.0
  for fa, fb in zip(taps_a, taps_b):
    per_position = jnp.sum(jnp.square(unit_normalize(fa) - unit_normalize(fb)), axis=-1)
    total = total + jnp.mean(per_position.reshape(per_position.shape[0], -1), axis=1)
  return total


class LPIPS(nnx.Module):
  """(x0, x1) float NHWC in [-1, 1] -> per-image LPIPS distance [N]."""

  def __init__(self, *, rngs: nnx.Rngs):
    convs, cin = [], 3
    for stage in STAGES:
      for cout in stage:
        convs.append(nnx.Conv(cin, cout, (3, 3), padding=1, precision=HIGHEST, rngs=rngs))
        cin = cout
    self.convs = nnx.List(convs)
    self.lins = nnx.List([
        nnx.Conv(stage[-1], 1, (1, 1), use_bias=False, precision=HIGHEST, rngs=rngs)
        for stage in STAGES])

  def features(self, x):
    """The five unit-normalised taps of VGG16 on scaled inputs."""
    x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    taps, convs = [], iter(self.convs)
    for i, stage in enumerate(STAGES):
      if i:
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
      for _ in stage:
        x = nnx.relu(next(convs)(x))
      taps.append(unit_normalize(x))
    return taps

  def __call__(self, x0, x1):
    total = 0.0
    for lin, f0, f1 in zip(self.lins, self.features(x0), self.features(x1)):
      total = total + lin((f0 - f1) ** 2).mean(axis=(1, 2, 3))
    return total
