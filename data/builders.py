"""tfds builders for the built-in datasets, prepared as array_record for grain random access.

Every builder stores `image` (uint8 PNG) and `label` (ClassLabel). The image-folder and ImageNet
builders store images ADM center-cropped (`preprocess.center_crop_adm`) at the resolution of
their builder config; `data/pipeline.py` is the usual way to build and read them.
"""
import concurrent.futures
import dataclasses
import importlib.resources
import io
import itertools
import os
import re
import tarfile

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tesserax.data import digits
from tesserax.data import preprocess
from tesserax.core.errors import TesseraxError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGENET_RESOLUTIONS = (64, 128, 256, 512)
IMAGENET_TRAIN_TAR = "ILSVRC2012_img_train.tar"
IMAGENET_VAL_TAR = "ILSVRC2012_img_val.tar"


@dataclasses.dataclass(eq=False)
class ResolutionConfig(tfds.core.BuilderConfig):
  """A builder config naming the square resolution the images are stored at."""
  resolution: int = 0


def image_folder_config(root: str, resolution: int) -> ResolutionConfig:
  """The config of image folder `root` at `resolution`, named `<basename>_<resolution>`."""
  basename = re.sub(r"[^\w.+-]", "_", os.path.basename(os.path.normpath(root)))
  return ResolutionConfig(name=f"{basename}_{resolution}", resolution=resolution)


def _features(shape, label):
  return tfds.features.FeaturesDict({"image": tfds.features.Image(shape=shape), "label": label})


def _adm_png(source, resolution: int, where: str) -> bytes:
  """The ADM center crop of an encoded image (path or file object) as RGB PNG bytes.

  Like guided-diffusion's image_datasets.py, the image is converted to RGB before cropping.
  """
  try:
    with Image.open(source) as image:
      image = image.convert("RGB")
  except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable or truncated data
    reason = "cannot identify image file" if isinstance(e, Image.UnidentifiedImageError) else e
    raise TesseraxError(f"corrupt image in {where} ({reason}); delete or replace it") from None
  return _png(preprocess.center_crop_adm(image, resolution))


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 HWC image, encoded by PIL (tfds would start TensorFlow for it)."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def _ordered_map(fn, items, chunk_size=256):
  """fn over `items` in order on a thread pool, reading at most `chunk_size` items ahead.

  PIL releases the GIL while decoding, resizing and encoding, so threads give real parallelism.
  """
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor() as pool:
    while chunk := list(itertools.islice(items, chunk_size)):
      yield from pool.map(fn, chunk)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder that downloads nothing, hence has no URL checksums.

  Saying so up front also keeps tfds 4.9.10 from resolving the class's code path, which imports
  `importlib_resources`, a package it does not require on Python >= 3.9
  (tensorflow/datasets#11212).
  """

  url_infos = None


class TesseraxDigits(_LocalBuilder):
  """scikit-learn's 8x8 digits with the fixed 1,500/297 train/test split of data/digits.py."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    size = digits.NATIVE_RESOLUTION
    return self.dataset_info_from_configs(
        features=_features((size, size, 1),
                           tfds.features.ClassLabel(num_classes=digits.NUM_CLASSES)),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # scikit-learn ships the data
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    images, labels = digits.digits_arrays(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": _png(image), "label": label}


class TesseraxImageFolder(_LocalBuilder):
  """Images in one subfolder per class, ADM center-cropped; config from `image_folder_config`."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  manual_dir is the image folder: ROOT/<class>/*.{png,jpg,jpeg} gives split `train`; or
  ROOT/train/<class>/... and optionally ROOT/val/<class>/... give splits `train` and `val`.
  Classes are numbered in sorted folder-name order of the train split.
  """

  def _info(self):
    size = self.builder_config.resolution
    # The class names are only known once the folder is scanned in `_split_generators`.
    return self.dataset_info_from_configs(
        features=_features((size, size, 3), tfds.features.ClassLabel()),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    split_dirs = {split: os.path.join(root, split) for split in ("train", "val")
                  if os.path.isdir(os.path.join(root, split))} or {"train": root}
    classes = _subfolders(split_dirs["train"])
    self.info.features["label"].names = classes
    return {split: self._generate_examples(path, classes) for split, path in split_dirs.items()}

  def _generate_examples(self, split_dir, classes):
    files = []
    for name in _subfolders(split_dir):
      if name not in classes:
        raise TesseraxError(f"class folder {os.path.join(split_dir, name)} is not a class of the "
                            "train split; rename or remove it")
      class_dir, label = os.path.join(split_dir, name), classes.index(name)
      files += [(f"{name}/{f}", label, os.path.join(class_dir, f))
                for f in sorted(os.listdir(class_dir)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
      raise TesseraxError(f"no .png/.jpg/.jpeg images in image folder {split_dir}; expected "
                          f"{split_dir}/<class>/<image>")
    size = self.builder_config.resolution

    def example(file):
      key, label, path = file
      return key, {"image": _adm_png(path, size, f"image folder: {path}"), "label": label}

    return _ordered_map(example, files)


def _subfolders(path):
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


class TesseraxImagenet2012(_LocalBuilder):
  """ILSVRC 2012 train and validation, ADM center-cropped at the config's resolution.

  Class order and validation labels are those of tfds' own imagenet2012 builder (its
  labels.txt and validation_labels.txt); splits are `train` and `validation`. PIL decodes the
  few CMYK JPEGs and the one PNG in the archives, which tfds' builder has to special-case.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ResolutionConfig(name=str(r), resolution=r) for r in IMAGENET_RESOLUTIONS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  manual_dir should contain {IMAGENET_TRAIN_TAR} and {IMAGENET_VAL_TAR}, downloaded after
  registering at https://image-net.org/download-images.
  """

  def _info(self):
    size = self.builder_config.resolution
    return self.dataset_info_from_configs(
        features=_features((size, size, 3),
                           tfds.features.ClassLabel(names=_tfds_imagenet_lines("labels.txt"))),
        supervised_keys=("image", "label"),
        homepage="https://image-net.org/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    train_tar = os.path.join(manual_dir, IMAGENET_TRAIN_TAR)
    val_tar = os.path.join(manual_dir, IMAGENET_VAL_TAR)
    for path in (train_tar, val_tar):
      if not os.path.isfile(path):
        raise TesseraxError(f"{os.path.basename(path)} not found: place it in {manual_dir}")
    synsets = {s: i for i, s in enumerate(self.info.features["label"].names)}
    val_synsets = _tfds_imagenet_lines("validation_labels.txt")
    # validation_labels.txt lists labels in file-name order, ILSVRC2012_val_00000001.JPEG first.
    val_labels = {f"ILSVRC2012_val_{i:08d}.JPEG": synsets[s] for i, s in enumerate(val_synsets, 1)}
    return {
        "train": self._generate_examples(_imagenet_train_images(train_tar, synsets), train_tar),
        "validation": self._generate_examples(_imagenet_val_images(val_tar, val_labels), val_tar),
    }

  def _generate_examples(self, images, archive):
    size = self.builder_config.resolution

    def example(image):
      name, label, data = image
      image = _adm_png(io.BytesIO(data), size, f"{archive}: {name}")
      return name, {"image": image, "label": label}

    return _ordered_map(example, images)


def _tfds_imagenet_lines(filename):
  """Lines of a label file shipped with tfds' imagenet2012 builder."""
  path = importlib.resources.files("tensorflow_datasets") / "datasets" / "imagenet2012" / filename
  return path.read_text().split()


def _imagenet_train_images(path, synsets):
  """(file name, label, JPEG bytes) from the train tar, a tar of per-synset tars nXXXXXXXX.tar."""
  with tarfile.open(path, "r|") as outer:
    for member in outer:
      if not member.isfile():
        continue
      synset = os.path.splitext(os.path.basename(member.name))[0]
      if synset not in synsets:
        raise TesseraxError(f"{member.name} in {path} is not an ILSVRC2012 synset archive "
                            "(expected nXXXXXXXX.tar); use the original archive")
      with tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read()), mode="r|") as inner:
        for image in inner:
          if image.isfile():
            yield image.name, synsets[synset], inner.extractfile(image).read()


def _imagenet_val_images(path, labels):
  """(file name, label, JPEG bytes) from the flat validation tar."""
  with tarfile.open(path, "r|") as tar:
    for member in tar:
      if not member.isfile():
        continue
      if member.name not in labels:
        raise TesseraxError(f"{member.name} in {path} is not an ILSVRC2012 validation image "
                            "(expected ILSVRC2012_val_XXXXXXXX.JPEG); use the original archive")
      yield member.name, labels[member.name], tar.extractfile(member).read()
