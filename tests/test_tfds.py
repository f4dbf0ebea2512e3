"""The tfds download-and-prepare path (the `tfds` extra, TensorFlow) without network; skipped without the extra."""
import importlib.util
import os
import time

import numpy as np
import pytest

from abl_jax import data

needs_extra = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                 reason="the tfds extra (TensorFlow) is not installed: pip install -e '.[tfds]'")


def _fake_cifar10(root, per_file: int = 3) -> None:
  """The layout of cifar-10-binary.tar.gz extracted, with `per_file` random records per batch file."""
  d = root / "cifar-10-batches-bin"
  d.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    records = [bytes([i % 10]) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes() for i in range(per_file)]
    (d / name).write_bytes(b"".join(records))
  (d / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")


@needs_extra
def test_builder_and_download_manager_construct_without_network(tmp_path):
  import tensorflow_datasets as tfds
  builder = tfds.builder("cifar10", data_dir=str(tmp_path))
  manager = builder._make_download_manager(download_dir=None, download_config=tfds.download.DownloadConfig())
  assert manager is not None
  assert any("cifar-10" in url for url in builder.url_infos)  # Needs importlib_resources (the extra has it).


@needs_extra
def test_download_and_prepare_with_a_local_download(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  _fake_cifar10(tmp_path / "extracted")
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      lambda self, url: str(tmp_path / "extracted"))
  monkeypatch.setattr(data, "_unreachable", lambda url: None)
  train, test = data.load_tfds("cifar10", data_dir=str(tmp_path / "tfds"))
  assert train.images.shape == (15, 32, 32, 3) and test.images.shape == (3, 32, 32, 3)
  assert train.class_names == tuple(f"c{i}" for i in range(10))


@needs_extra
def test_without_network_stops_at_once_saying_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_unreachable", lambda url: f"{url} is unreachable (ConnectionError; no network?)")
  t0 = time.perf_counter()
  with pytest.raises(data.DataError, match=r"cannot download 'cifar10'.*--config\.data\.source=folder.*"
                                           r"tfds_data_dir") as e:
    data.load_tfds("cifar10", data_dir=str(tmp_path))
  assert time.perf_counter() - t0 < 30 and "; ;" not in str(e.value)
  assert not os.path.exists(tmp_path / "downloads")


def test_unreachable_host_is_reported_within_seconds():
  pytest.importorskip("requests")
  t0 = time.perf_counter()
  assert "unreachable" in data._unreachable("http://127.0.0.1:9/cifar.tar.gz", timeout=2)
  assert time.perf_counter() - t0 < 10
