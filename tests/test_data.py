"""Tests of the tfds builders and the grain training pipeline, on tiny datasets built here."""
import collections
import importlib.resources
import io
import json
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits

from tesserax.data import pipeline
from tesserax.core.errors import TesseraxError


def _cfg(data_dir, **overrides):
  cfg = dict(name="digits", data_dir=str(data_dir), resolution=8, split="train",
             random_flip=False, manual_dir="", num_classes=10)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _uint8(images):
  """Inverse of the [-1, 1] model range, exact for images that came from uint8."""
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _adm_crop(image, size):
  """guided-diffusion's center_crop_arr, written out: RGB, BOX-halve while the short side is at
  least 2*size, BICUBIC-resize the short side to size, take the centre size x size."""
  image = image.convert("RGB")
  while min(image.width, image.height) >= 2 * size:
    image = image.resize((image.width // 2, image.height // 2), Image.BOX)
  scale = size / min(image.width, image.height)
  image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
  pixels = np.array(image)
  top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
  return pixels[top:top + size, left:left + size]


def _random_image(rng, width, height, mode="RGB"):
  channels = {"RGB": 3, "L": 1}[mode]
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  return Image.fromarray(pixels[..., 0] if mode == "L" else pixels)


def _encoded(image, fmt):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def _assert_same_examples(images, labels, expected):
  """The split holds exactly the (uint8 crop, label) pairs of `expected`, in any order."""
  got = sorted((_uint8(image).tobytes(), int(label)) for image, label in zip(images, labels))
  want = sorted((crop.tobytes(), label) for crop, label in expected)
  assert got == want


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  pipeline.build("digits", str(data_dir))
  return data_dir


# ----------------------------------------------------------------------------------- digits


def test_digits_splits_are_sklearn_digits(digits_dir):
  train_images, train_labels = pipeline.load_split(_cfg(digits_dir), "train")
  test_images, test_labels = pipeline.load_split(_cfg(digits_dir), "test")
  assert train_images.shape == (1500, 8, 8, 1) and test_images.shape == (297, 8, 8, 1)
  assert train_labels.dtype == np.int32 and set(train_labels) == set(range(10))
  assert test_labels.min() >= 0 and test_labels.max() < 10
  bunch = load_digits()
  sklearn_images = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)
  want = collections.Counter((im.tobytes(), int(y)) for im, y in zip(sklearn_images, bunch.target))
  got = collections.Counter(
      (_uint8(im[..., 0]).tobytes(), int(y))
      for im, y in zip(np.concatenate([train_images, test_images]),
                       np.concatenate([train_labels, test_labels])))
  assert got == want


@pytest.mark.parametrize("resolution", [16, 32])
def test_load_split_resolution(digits_dir, resolution):
  native, labels = pipeline.load_split(_cfg(digits_dir), "train")
  images, resized_labels = pipeline.load_split(_cfg(digits_dir, resolution=resolution), "train")
  assert images.shape == (1500, resolution, resolution, 1) and images.dtype == np.float32
  assert images.min() >= -1.0 and images.max() <= 1.0
  np.testing.assert_array_equal(resized_labels, labels)
  for i in range(5):
    small = Image.fromarray(_uint8(native[i, ..., 0]))
    want = np.asarray(small.resize((resolution, resolution), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(images[i, ..., 0], want / 127.5 - 1.0)


# ----------------------------------------------------------------------------------- loader


def test_loader_batches_independent_of_process_count(digits_dir):
  cfg = _cfg(digits_dir, resolution=16, random_flip=True)
  num_batches = 20  # 1,920 positions: crosses the epoch boundary at 1,500
  single = _take(pipeline.make_train_loader(cfg, 96, seed=3, process_index=0, process_count=1),
                 num_batches)
  for count in (2, 3):
    shards = [_take(pipeline.make_train_loader(cfg, 96, 3, index, count), num_batches)
              for index in range(count)]
    for b in range(num_batches):
      assert shards[0][b]["image"].shape == (96 // count, 16, 16, 1)
      for key in ("image", "label"):
        np.testing.assert_array_equal(
            np.concatenate([shard[b][key] for shard in shards]), single[b][key])


def test_epoch_order_is_the_seeded_permutation(digits_dir):
  images, labels = pipeline.load_split(_cfg(digits_dir), "train")
  batches = _take(pipeline.make_train_loader(_cfg(digits_dir), 100, 5, 0, 1), 30)
  served_images = np.concatenate([b["image"] for b in batches])
  served_labels = np.concatenate([b["label"] for b in batches])
  assert served_labels.dtype == np.int32
  for epoch in range(2):
    order = np.random.default_rng([5, epoch]).permutation(1500)
    rows = slice(epoch * 1500, (epoch + 1) * 1500)
    np.testing.assert_array_equal(served_images[rows], images[order])
    np.testing.assert_array_equal(served_labels[rows], labels[order])
    assert collections.Counter(served_labels[rows]) == collections.Counter(labels)


def test_random_flip_mirrors_about_half(digits_dir):
  plain = _take(pipeline.make_train_loader(_cfg(digits_dir), 150, 7, 0, 1), 10)
  flipped = _take(pipeline.make_train_loader(_cfg(digits_dir, random_flip=True), 150, 7, 0, 1), 10)
  plain = np.concatenate([b["image"] for b in plain])
  flipped = np.concatenate([b["image"] for b in flipped])
  same = (flipped == plain).all(axis=(1, 2, 3))
  mirrored = (flipped == plain[:, :, ::-1]).all(axis=(1, 2, 3))
  assert (same | mirrored).all()
  asymmetric = ~(plain == plain[:, :, ::-1]).all(axis=(1, 2, 3))
  assert 0.4 < mirrored[asymmetric].mean() < 0.6


def test_loader_state_resumes_exactly(digits_dir):
  cfg = _cfg(digits_dir, resolution=16, random_flip=True)
  uninterrupted = _take(pipeline.make_train_loader(cfg, 64, 11, 1, 2), 40)
  loader = pipeline.make_train_loader(cfg, 64, 11, 1, 2)
  _take(loader, 33)
  state = json.loads(json.dumps(loader.get_state()))
  resumed = pipeline.make_train_loader(cfg, 64, 11, 1, 2)
  resumed.set_state(state)
  for want, got in zip(uninterrupted[33:], _take(resumed, 7)):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  # The state counts global batches, so it also resumes a run on another number of processes.
  single = pipeline.make_train_loader(cfg, 64, 11, 0, 1)
  single.set_state(state)
  np.testing.assert_array_equal(next(single)["image"][32:], uninterrupted[33]["image"])


def test_loader_rejects_indivisible_batch(digits_dir):
  with pytest.raises(TesseraxError, match="divisible"):
    pipeline.make_train_loader(_cfg(digits_dir), 10, 0, 0, 3)


# ------------------------------------------------------------------------------ image folder


def test_image_folder_labels_and_adm_crop(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "pets"
  files = {  # path -> (image, label); classes are numbered in sorted folder order
      "cats/wide.png": (_random_image(rng, 150, 90), 0),
      "cats/tall.jpg": (_random_image(rng, 40, 70), 0),
      "dogs/gray.PNG": (_random_image(rng, 33, 100, "L"), 1),
  }
  expected = []
  for name, (image, label) in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encoded(image, "JPEG" if name.endswith(".jpg") else "PNG"))
    expected.append((_adm_crop(Image.open(path), 32), label))
  (root / "cats" / "notes.txt").write_text("not an image")
  data_dir = tmp_path / "tfds"
  pipeline.build("image_folder", str(data_dir), manual_dir=str(root), resolution=32)
  cfg = _cfg(data_dir, name="image_folder", manual_dir=str(root), resolution=32, num_classes=2)
  images, labels = pipeline.load_split(cfg, "train")
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32
  _assert_same_examples(images, labels, expected)
  batch = next(pipeline.make_train_loader(cfg, 4, 0, 0, 1))
  assert batch["image"].shape == (4, 32, 32, 3) and set(batch["label"]) <= {0, 1}
  with pytest.raises(TesseraxError, match="not prepared"):
    pipeline.load_split(_cfg(data_dir, name="image_folder", manual_dir=str(root), resolution=16,
                             num_classes=2), "train")


def test_image_folder_train_val_splits(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / "flowers"
  expected = {"train": [], "val": []}
  for split, name, label in [("train", "a", 0), ("train", "b", 1), ("val", "b", 1)]:
    (root / split / name).mkdir(parents=True)
    for i in range(2):
      image = _random_image(rng, 20 + i, 24)
      image.save(root / split / name / f"{i}.png")
      expected[split].append((_adm_crop(image, 16), label))
  data_dir = tmp_path / "tfds"
  pipeline.build("image_folder", str(data_dir), manual_dir=str(root), resolution=16)
  cfg = _cfg(data_dir, name="image_folder", manual_dir=str(root), resolution=16, num_classes=2)
  for split in ("train", "val"):
    _assert_same_examples(*pipeline.load_split(cfg, split), expected[split])


def test_image_folder_corrupt_image_names_file(tmp_path):
  root = tmp_path / "broken"
  (root / "cats").mkdir(parents=True)
  _random_image(np.random.default_rng(2), 20, 20).save(root / "cats" / "good.png")
  bad = root / "cats" / "bad.png"
  bad.write_bytes(b"this is not a png")
  with pytest.raises(TesseraxError, match=f"corrupt image .*{bad}"):
    pipeline.build("image_folder", str(tmp_path / "tfds"), manual_dir=str(root), resolution=16)


def test_image_folder_missing_or_empty_dir(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(TesseraxError, match=str(missing)):
    pipeline.build("image_folder", str(tmp_path / "tfds"), manual_dir=str(missing), resolution=16)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(TesseraxError, match=str(empty)):
    pipeline.build("image_folder", str(tmp_path / "tfds"), manual_dir=str(empty), resolution=16)


# ------------------------------------------------------------------------------ imagenet2012


def _tfds_imagenet_file(name):
  """A label file of tfds' own imagenet2012 builder: one synset per line."""
  path = importlib.resources.files("tensorflow_datasets").joinpath("datasets", "imagenet2012", name)
  return path.read_text().splitlines()


def _add_to_tar(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_imagenet2012_from_fake_archives(tmp_path):
  rng = np.random.default_rng(3)
  synsets = _tfds_imagenet_file("labels.txt")
  val_synsets = _tfds_imagenet_file("validation_labels.txt")
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  expected = {"train": [], "validation": []}
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train_tar:
    for label in (7, 912):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as synset_tar:
        for i, (width, height) in enumerate([(90, 70), (70, 150)]):
          jpeg = _encoded(_random_image(rng, width, height), "JPEG")
          _add_to_tar(synset_tar, f"{synsets[label]}_{i}.JPEG", jpeg)
          expected["train"].append((_adm_crop(Image.open(io.BytesIO(jpeg)), 64), label))
      _add_to_tar(train_tar, f"{synsets[label]}.tar", inner.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val_tar:
    for i in (1, 2, 3):
      jpeg = _encoded(_random_image(rng, 80, 66), "JPEG")
      _add_to_tar(val_tar, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg)
      label = synsets.index(val_synsets[i - 1])
      expected["validation"].append((_adm_crop(Image.open(io.BytesIO(jpeg)), 64), label))
  data_dir = tmp_path / "tfds"
  pipeline.build("imagenet2012", str(data_dir), manual_dir=str(manual_dir), resolution=64)
  cfg = _cfg(data_dir, name="imagenet2012", resolution=64, num_classes=1000,
             manual_dir=str(manual_dir))
  for split in ("train", "validation"):
    images, labels = pipeline.load_split(cfg, split)
    assert images.shape[1:] == (64, 64, 3)
    _assert_same_examples(images, labels, expected[split])


def test_imagenet2012_missing_archive_names_it(tmp_path):
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w"):
    pass
  with pytest.raises(TesseraxError, match=f"ILSVRC2012_img_val.tar.*{manual_dir}"):
    pipeline.build("imagenet2012", str(tmp_path / "tfds"), manual_dir=str(manual_dir),
                   resolution=64)
