"""ConvNeXt (Liu et al. 2022) as torchvision builds it (torchvision/models/convnext.py), and the
ConvNeXt-S logit loss of TiTok (bytedance/1d-tokenizer modeling/modules/perceptual_loss.py).

Network, NHWC:
- stem (features.0): conv 4x4 stride 4 (bias), LayerNorm over channels (eps 1e-6);
- four stages (features.1/3/5/7) of CNBlocks: depthwise conv 7x7 pad 3 (bias), LayerNorm (eps
  1e-6), Linear C -> 4C, exact GELU, Linear 4C -> C, times the per-channel `layer_scale`, plus
  the input (stochastic depth is the identity at evaluation);
- between stages (features.2/4/6): LayerNorm (eps 1e-6), conv 2x2 stride 2 (bias);
- head: global average pool, LayerNorm (eps 1e-6) (classifier.0), Linear to the classes
  (classifier.2).
ConvNeXt-S: depths (3, 3, 27, 3), widths (96, 192, 384, 768), 1000 classes; the IMAGENET1K_V1
weights are convnext_small-0c510722.pth (backbones/weights.py "convnext_small").

`logit_loss`: images in [0, 1] resized to 224 x 224 (bilinear, half-pixel centres, antialiased:
F.interpolate(..., antialias=True)), ImageNet-normalised, and the mean squared difference of
the two images' logits.
"""
import jax
import jax.numpy as jnp
from flax import nnx

CONVNEXT_S = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), num_classes=1000)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EPS = 1e-6


def _layer_norm(dim, rngs):
  return nnx.LayerNorm(dim, epsilon=EPS, use_fast_variance=False, rngs=rngs)


class CNBlock(nnx.Module):

  def __init__(self, dim, *, rngs):
    self.dwconv = nnx.Conv(dim, dim, (7, 7), padding=3, feature_group_count=dim, rngs=rngs)
    self.norm = _layer_norm(dim, rngs)
    self.pwconv1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.pwconv2 = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.layer_scale = nnx.Param(jnp.full((dim, 1, 1), 1e-6))  # torch's (C, 1, 1)

  def __call__(self, x):
    y = self.pwconv2(jax.nn.gelu(self.pwconv1(self.norm(self.dwconv(x))), approximate=False))
    return x + self.layer_scale[...].reshape(-1) * y


class Downsample(nnx.Module):

  def __init__(self, cin, cout, *, rngs):
    self.norm = _layer_norm(cin, rngs)
    self.conv = nnx.Conv(cin, cout, (2, 2), strides=2, padding="VALID", rngs=rngs)

  def __call__(self, x):
    return self.conv(self.norm(x))


class ConvNeXt(nnx.Module):
  """ImageNet-normalised images [B, H, W, 3] -> logits [B, num_classes]."""

  def __init__(self, depths=CONVNEXT_S["depths"], dims=CONVNEXT_S["dims"],
               num_classes=CONVNEXT_S["num_classes"], *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, dims[0], (4, 4), strides=4, padding="VALID", rngs=rngs)
    self.stem_norm = _layer_norm(dims[0], rngs)
    self.stages = nnx.List([nnx.List([CNBlock(dim, rngs=rngs) for _ in range(depth)])
                            for depth, dim in zip(depths, dims)])
    self.downsamples = nnx.List([Downsample(dims[i], dims[i + 1], rngs=rngs)
                                 for i in range(len(dims) - 1)])
    self.head_norm = _layer_norm(dims[-1], rngs)
    self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem_norm(self.stem(x))
    for i, stage in enumerate(self.stages):
      if i:
        x = self.downsamples[i - 1](x)
      for block in stage:
        x = block(x)
    return self.head(self.head_norm(jnp.mean(x, axis=(1, 2))))


BLOCK_INDEX = {"dwconv": "0", "norm": "2", "pwconv1": "3", "pwconv2": "5"}  # CNBlock.block


def torchvision_key(flax_key: str) -> str:
  """The torchvision state-dict key of a ConvNeXt parameter ("stages.2.5.pwconv1.kernel" ->
  "features.5.5.block.3.weight")."""
  *path, leaf = flax_key.split(".")
  leaf = "weight" if leaf in ("kernel", "scale") else leaf
  if path[0] == "stages":
    prefix = ["features", str(2 * int(path[1]) + 1), path[2]]
    return ".".join(prefix + (["block", BLOCK_INDEX[path[3]], leaf] if len(path) > 3
                              else ["layer_scale"]))
  if path[0] == "downsamples":
    path = ["features", str(2 * int(path[1]) + 2), {"norm": "0", "conv": "1"}[path[2]]]
  else:
    path = {"stem": ["features", "0", "0"], "stem_norm": ["features", "0", "1"],
            "head_norm": ["classifier", "0"], "head": ["classifier", "2"]}[path[0]]
  return ".".join(path + [leaf])


def torchvision_rules(expected: dict) -> dict:
  """backbones/weights.convert rules {torch key: (flax key, flax shape, permutation)} for the
  ConvNeXt parameters `expected` {flax key: shape}: Linear [out, in] -> [in, out], conv OIHW ->
  HWIO, the rest (LayerNorm, biases, layer_scale) as is."""
  perms = {2: (1, 0), 4: (2, 3, 1, 0)}
  return {torchvision_key(k): (k, shape, perms[len(shape)] if k.endswith(".kernel") else None)
          for k, shape in expected.items()}


def resize(images, size, antialias=True):
  """F.interpolate(images, size, mode="bilinear", align_corners=False, antialias=antialias),
  NHWC."""
  n, h, w, c = images.shape
  scale = jnp.array([size / h, size / w])
  return jax.image.scale_and_translate(images, (n, size, size, c), (1, 2), scale, jnp.zeros(2),
                                       "linear", antialias=antialias)


def logit_loss(net: ConvNeXt, images01, reconstructions01, resolution=224):
  """Per-image mean squared difference [B] of the ConvNeXt logits of two image batches in
  [0, 1] (NHWC), each resized to `resolution` and ImageNet-normalised; its batch mean is
  PerceptualLoss("convnext_s")."""
  mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
  logits = lambda x: net((resize(x, resolution) - mean) / std)
  return jnp.mean(jnp.square(logits(images01) - logits(reconstructions01)), axis=-1)
