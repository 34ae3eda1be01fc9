"""scikit-learn's bundled 8x8 handwritten digits: 1,797 real labelled images, ten classes.

The split is fixed once for everyone: a seeded permutation puts 1,500 images in `train` and the
remaining 297 in `test`. Pixels (0..16 in scikit-learn) are stored as uint8 (round(v * 255/16)).
The served resolution is a pipeline choice; see `digits_arrays` and data/preprocess.py.
"""
import numpy as np

NUM_CLASSES = 10
NATIVE_RESOLUTION = 8
NUM_TRAIN = 1500
SPLIT_SEED = 0


def digits_arrays(split: str):
  """(images uint8 [N, 8, 8, 1], labels int32 [N]) for split 'train' or 'test'."""
  from sklearn.datasets import load_digits
  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
  if split == "train":
    index = order[:NUM_TRAIN]
  elif split == "test":
    index = order[NUM_TRAIN:]
  else:
    from tesserax.core.errors import TesseraxError
    raise TesseraxError(f"digits has splits 'train' and 'test', not {split!r}")
  return images[index], labels[index]
