"""Image conversions shared by every dataset, the trainer and the evaluators.

Inside the library images are float32 NHWC in [-1, 1]; uint8 appears only at I/O boundaries.
"""
import numpy as np
from PIL import Image


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8, rounding as DiT/LightningDiT do: clip(127.5 x + 128)."""
  return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def resize_uint8(images: np.ndarray, resolution: int) -> np.ndarray:
  """Bilinear resize of a uint8 NHWC batch to resolution x resolution (PIL, per image)."""
  n, h, w, c = images.shape
  if (h, w) == (resolution, resolution):
    return images
  out = np.empty((n, resolution, resolution, c), np.uint8)
  for i in range(n):
    img = images[i, :, :, 0] if c == 1 else images[i]
    resized = np.asarray(Image.fromarray(img).resize((resolution, resolution), Image.BILINEAR))
    out[i] = resized.reshape(resolution, resolution, c)
  return out


def center_crop_adm(image: Image.Image, image_size: int) -> np.ndarray:
  """ADM center crop (guided-diffusion image_datasets.py): box-halve while the short side is
  at least twice the target, bicubic-resize the short side to `image_size`, crop the centre."""
  while min(image.size) >= 2 * image_size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = image_size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image.convert("RGB"))
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
  """torchvision Resize(size) + CenterCrop(size) of an RGB-converted PIL image, as LightningDiT
  evaluate_tokenizer.py evaluates tokenizers: the short side
  bilinearly resized (PIL, antialiased) to `size`, the long side to int(size * long / short),
  then the crop at top = int(round((h - size) / 2.0)), left likewise (Python's round)."""
  image = image.convert("RGB")
  w, h = image.size
  new_long = int(size * max(w, h) / min(w, h))
  new_size = (size, new_long) if w <= h else (new_long, size)
  if new_size != (w, h):
    image = image.resize(new_size, Image.BILINEAR)
  arr = np.asarray(image)
  top = int(round((arr.shape[0] - size) / 2.0))
  left = int(round((arr.shape[1] - size) / 2.0))
  return arr[top:top + size, left:left + size]
