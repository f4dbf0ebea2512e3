"""Tests of abl_jax.data: synthetic data, image folders and tars, subsets, tfds."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image
import pytest

from abl_jax import cache, data
from configs import common

CLASSES = ("cat", "ant", "bee")  # Written unsorted; labels must follow the sorted names.


def _write_folder(root, per_class=(3, 2), shape=(6, 5, 3), seed=0) -> dict[str, list[tuple[int, np.ndarray]]]:
  """Random PNGs in train/<class>/, test/<class>/; returns (label, pixels) per split in loading order."""
  rng = np.random.default_rng(seed)
  expected = {}
  for split, n in zip(("train", "test"), per_class):
    expected[split] = []
    for label, name in enumerate(sorted(CLASSES)):
      os.makedirs(root / split / name)
      for i in range(n):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
        expected[split].append((label, pixels))
  return expected


def _check(ds: data.Dataset, expected: list[tuple[int, np.ndarray]]) -> None:
  assert ds.class_names == tuple(sorted(CLASSES))
  assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.labels, [label for label, _ in expected])
  np.testing.assert_array_equal(ds.images, np.stack([pixels for _, pixels in expected]))


def _no_decoding(monkeypatch):
  def fail(_):
    raise AssertionError("decoded although a cache exists")
  monkeypatch.setattr(data, "_decode", fail)


def _cfg(**fields):
  cfg = common.base_config().data
  cfg.update(fields)
  return cfg


def test_synthetic_shapes_balance_and_determinism():
  train, test = data.synthetic(100, 50, 4, 16, seed=3)
  assert train.images.shape == (100, 16, 16, 3) and test.images.shape == (50, 16, 16, 3)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert train.class_names == ("class0", "class1", "class2", "class3")
  np.testing.assert_array_equal(train.class_counts(), [25] * 4)
  assert max(test.class_counts()) - min(test.class_counts()) <= 1
  again, _ = data.synthetic(100, 50, 4, 16, seed=3)
  np.testing.assert_array_equal(again.images, train.images)
  other, _ = data.synthetic(100, 50, 4, 16, seed=4)
  assert not np.array_equal(other.images, train.images)
  assert not np.array_equal(train.images[:50], test.images)
  # Examples of one class vary (scene, shift, brightness, noise) but mostly stay closest to their class mean
  # (chance is 0.25; the class template is deliberately only 40% of each image).
  means = np.stack([train.images[train.labels == c].mean(0) for c in range(4)])
  x = train.images.astype(np.float32)
  assert x[train.labels == 0].std(0).mean() > 5
  dists = ((x[:, None] - means[None]) ** 2).mean(axis=(2, 3, 4))
  assert (dists.argmin(1) == train.labels).mean() > 0.6


def test_folder_loads_sorted_classes_exact_pixels(tmp_path):
  expected = _write_folder(tmp_path / "data")
  train, test = data.load_folder(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
  _check(train, expected["train"])
  _check(test, expected["test"])


def test_tar_with_top_level_dir_loads_the_same(tmp_path):
  expected = _write_folder(tmp_path / "data")
  tar_path = tmp_path / "images.tar.gz"
  with tarfile.open(tar_path, "w:gz") as tar:
    tar.add(tmp_path / "data", arcname="images")
  train, test = data.load_folder(str(tar_path), cache_dir=str(tmp_path / "cache"))
  _check(train, expected["train"])
  _check(test, expected["test"])


def test_cache_is_written_reused_and_invalidated(tmp_path, monkeypatch):
  expected = _write_folder(tmp_path / "data")
  cache = tmp_path / "cache"
  data.load_folder(str(tmp_path / "data"), cache_dir=str(cache))
  assert len(list(cache.glob("data-*.npz"))) == 1
  _no_decoding(monkeypatch)
  train, _ = data.load_folder(str(tmp_path / "data"), cache_dir=str(cache))
  _check(train, expected["train"])
  Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "data" / "train" / "ant" / "new.png")
  with pytest.raises(AssertionError, match="decoded"):
    data.load_folder(str(tmp_path / "data"), cache_dir=str(cache))


def test_exclusive_waits_for_another_process_making_the_same_entry(tmp_path):
  # Another process holds the entry's lock, says so, and makes the entry before letting go: inside exclusive(),
  # the entry is there, so a parallel run reads it instead of training it again.
  path = str(tmp_path / "surrogates" / "small_cnn-0123")
  os.makedirs(os.path.dirname(path))
  holder = ("import fcntl, os, sys, time\n"
            "path = sys.argv[1]\n"
            "with open(path + '.lock', 'w') as f:\n"
            "  fcntl.flock(f, fcntl.LOCK_EX)\n"
            "  open(path + '.ready', 'w').close()\n"
            "  time.sleep(1)\n"
            "  os.makedirs(path)\n")
  proc = subprocess.Popen([sys.executable, "-c", holder, path])
  try:
    for _ in range(600):
      if os.path.exists(path + ".ready") or proc.poll() is not None:
        break
      time.sleep(0.05)
    assert os.path.exists(path + ".ready") and not os.path.isdir(path)
    with cache.exclusive(path):
      assert os.path.isdir(path)
  finally:
    proc.wait()
  assert proc.returncode == 0


def test_default_cache_dir_is_under_xdg_cache_home(tmp_path, monkeypatch):
  _write_folder(tmp_path / "data")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  data.load_folder(str(tmp_path / "data"))
  assert len(list((tmp_path / "xdg" / "abl_jax").glob("*.npz"))) == 1


def test_folder_errors_name_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.data\.path=.*does not exist"):
    data.load_folder(str(tmp_path / "missing"))
  (tmp_path / "empty" / "train").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"config\.data\.path=.*holds no image folder"):
    data.load_folder(str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
  _write_folder(tmp_path / "odd")
  os.rename(tmp_path / "odd" / "test" / "bee", tmp_path / "odd" / "test" / "wasp")
  with pytest.raises(ValueError, match="different classes"):
    data.load_folder(str(tmp_path / "odd"), cache_dir=str(tmp_path / "cache"))


def test_mixed_image_shapes_are_rejected(tmp_path):
  _write_folder(tmp_path / "data")
  Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "data" / "train" / "cat" / "big.png")
  with pytest.raises(ValueError, match="differ in shape"):
    data.load_folder(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))


def test_load_rejects_unknown_source():
  with pytest.raises(ValueError, match=r"^config\.data\.source='x' is unknown; allowed: tfds, folder, synthetic$"):
    data.load(_cfg(source="x"), seed=0)


def test_balanced_subset():
  train, _ = data.synthetic(200, 10, 4, 8, seed=0)
  sub = data.balanced_subset(train, 40, seed=1)
  np.testing.assert_array_equal(sub.class_counts(), [10] * 4)
  odd = data.balanced_subset(train, 42, seed=1)
  assert len(odd) == 42 and sorted(odd.class_counts()) == [10, 10, 11, 11]
  np.testing.assert_array_equal(data.balanced_subset(train, 40, seed=1).images, sub.images)


def test_load_subsets_and_shuffles_train_deterministically(tmp_path):
  _write_folder(tmp_path / "data", per_class=(8, 4))
  cfg = _cfg(source="folder", path=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
             train_size=18, test_size=6)
  train, test = data.load(cfg, seed=0)
  assert len(train) == 18 and len(test) == 6
  np.testing.assert_array_equal(train.class_counts(), [6, 6, 6])
  np.testing.assert_array_equal(test.class_counts(), [2, 2, 2])
  assert not np.all(np.diff(train.labels) >= 0), "train split must be shuffled"
  again, _ = data.load(cfg, seed=0)
  np.testing.assert_array_equal(again.images, train.images)
  np.testing.assert_array_equal(again.labels, train.labels)
  other, _ = data.load(cfg, seed=1)
  assert not np.array_equal(other.labels, train.labels)
  cfg.train_size = 25
  with pytest.raises(ValueError, match=r"config\.data\.train_size=25"):
    data.load(cfg, seed=0)


def test_load_synthetic_config():
  cfg = common.apply_variant(common.base_config(), "smoke").data
  train, test = data.load(cfg, seed=0)
  assert train.images.shape == (1024, 32, 32, 3) and len(test) == 256 and train.num_classes == 10


def test_tfds_reads_a_mocked_data_source(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  # mock_data sets the fake `__getitems__` as an unbound instance attribute, so it misses `self`
  # (tfds 4.9.10); keep its generator and drop `self`. `__getitem__` is mocked correctly.
  monkeypatch.setattr(mocking, "_getitems", lambda keys, generator, serialized=False: [generator[k] for k in keys])
  with tfds.testing.mock_data(num_examples=1100):  # More than one read batch.
    train, test = data.load_tfds("cifar10")
  for ds in (train, test):
    assert ds.images.shape == (1100, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and 0 <= ds.labels.min() and ds.labels.max() < 10
    # Names come from the prepared dataset_info.json; the mock has none, so cifar10 says '0'..'9'.
    assert ds.class_names == tuple(str(i) for i in range(10))
  assert ds.images.std() > 10  # Real (random) records, not zeros.


def test_tfds_without_data_suggests_the_folder(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(data.DataError, match=r"'cifar10'.*--config\.data\.source=folder") as e:
    data.load_tfds("cifar10", data_dir=str(tmp_path))
  assert "; ;" not in str(e.value)


def _jpeg_folder(root, n: int = 2) -> None:
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{i}.jpg")


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], r"train/dog/1\.jpg cannot be decoded as an image \(OSError: (Truncated File Read|image file is truncated)"),
    (lambda b: np.random.default_rng(1).bytes(len(b)), r"train/dog/1\.jpg cannot be decoded as an image "
                                                       r"\(UnidentifiedImageError"),
])
def test_a_damaged_image_is_named(tmp_path, damage, message):
  _jpeg_folder(tmp_path / "imgs")
  path = tmp_path / "imgs" / "train" / "dog" / "1.jpg"
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(data.DataError, match=message + r".*replace or delete that file"):
    data.load_folder(str(tmp_path / "imgs"), str(tmp_path / "cache"))
  import tarfile
  with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
    tar.add(tmp_path / "imgs", arcname="imgs")
  with pytest.raises(data.DataError, match=r"imgs\.tar\.gz: member imgs/" + message):
    data.load_folder(str(tmp_path / "imgs.tar.gz"), str(tmp_path / "cache"))


def test_a_truncated_tar_is_named(tmp_path):
  _jpeg_folder(tmp_path / "imgs", n=30)
  import tarfile
  with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
    tar.add(tmp_path / "imgs", arcname="imgs")
  blob = (tmp_path / "imgs.tar.gz").read_bytes()
  (tmp_path / "imgs.tar.gz").write_bytes(blob[:len(blob) * 2 // 3])
  with pytest.raises(data.DataError, match=r"config\.data\.path='.*imgs\.tar\.gz' is truncated or damaged .*"
                                           r"the last intact member imgs/.*copy or download the archive again"):
    data.load_folder(str(tmp_path / "imgs.tar.gz"), str(tmp_path / "cache"))


def test_downsample_averages_each_block_and_rounds():
  rows = [[0, 1, 10, 10], [2, 2, 10, 10], [255, 255, 3, 4], [255, 254, 4, 4]]
  images = np.array([rows], np.uint8)[..., None]
  out = data.downsample(images, 2)
  assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 1)
  # Block means 1.25, 10, 254.75, 3.75, rounded.
  np.testing.assert_array_equal(out[0, :, :, 0], [[1, 10], [255, 4]])
  assert data.downsample(images, 1) is images
  with pytest.raises(ValueError, match=r"a downsampling factor of 3 does not divide the image size 4x4"):
    data.downsample(images, 3)
