"""Image-classification datasets as uint8 numpy arrays: tfds, image folders, synthetic.

    train, test = data.load(config.data, seed=config.seed)
    train.images  # uint8 [N, 32, 32, 3]; train.labels  # int32 [N]
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import io
import os
import tarfile
import zlib
from typing import Iterable

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from abl_jax import cache as cache_lib, registry

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
_CHUNK = 1000  # Images per decoding task and per tfds batch read.
_LOG_EVERY = 10_000

Seed = int | np.random.SeedSequence


class DataError(ValueError):
  """The configured data cannot be read: a damaged archive or image, or tfds data that is not there."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images (uint8 NHWC, 0..255) with int32 labels and the class names."""
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}")
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"labels must be [N={self.images.shape[0]}], got {self.labels.shape}")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def take(self, indices: np.ndarray) -> "Dataset":
    """The examples at `indices`, in that order."""
    return Dataset(self.images[indices], self.labels[indices], self.class_names)

  def class_counts(self) -> np.ndarray:
    """Number of examples of each class, [num_classes]."""
    return np.bincount(self.labels, minlength=self.num_classes)


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
  """uint8 images [N, H, W, C] averaged over `factor` x `factor` blocks and rounded: [N, H/factor, W/factor, C]."""
  if factor == 1:
    return images
  n, h, w, c = images.shape
  if h % factor or w % factor:
    raise ValueError(f"a downsampling factor of {factor} does not divide the image size {h}x{w}")
  blocks = images.astype(np.float32).reshape(n, h // factor, factor, w // factor, factor, c)
  return blocks.mean(axis=(2, 4)).round().astype(np.uint8)


def fingerprint(*arrays: np.ndarray) -> str:
  """A 16-hex-digit hash of the arrays' dtypes, shapes and values: which data a run saw."""
  h = hashlib.sha1()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def load(cfg: ml_collections.ConfigDict, seed: int) -> tuple[Dataset, Dataset]:
  """The (train, test) splits that `config.data` describes; train is shuffled by `seed`."""
  if cfg.source == "tfds":
    train, test = load_tfds(cfg.name, cfg.tfds_data_dir)
    what = f"tfds {cfg.name!r}"
  elif cfg.source == "folder":
    train, test = load_folder(cfg.path, cfg.cache_dir)
    what = f"image folder {cfg.path!r}"
  elif cfg.source == "synthetic":
    train, test = synthetic(cfg.synthetic_train_size, cfg.synthetic_test_size, cfg.synthetic_classes,
                            cfg.image_size, seed)
    what = "synthetic data"
  else:
    registry.check_name("config.data.source", cfg.source)
  subset_seed, test_seed, shuffle_seed = np.random.SeedSequence(seed).spawn(3)
  train = _maybe_subset(train, cfg.train_size, subset_seed, "config.data.train_size")
  test = _maybe_subset(test, cfg.test_size, test_seed, "config.data.test_size")
  # Folder data comes sorted by class; later code takes the training order as given.
  train = train.take(np.random.default_rng(shuffle_seed).permutation(len(train)))
  logging.info("Loaded %s: train %s, test %s, %d classes (%s)", what, train.images.shape, test.images.shape,
               train.num_classes, ", ".join(train.class_names))
  return train, test


def _maybe_subset(ds: Dataset, size: int, seed: Seed, field: str) -> Dataset:
  if not size:
    return ds
  if size < 0 or size > len(ds):
    raise ValueError(f"{field}={size} must be in [0, {len(ds)}] (the split's size; 0 = all of it)")
  return balanced_subset(ds, size, seed, field)


def balanced_subset(ds: Dataset, size: int, seed: Seed, field: str = "size") -> Dataset:
  """`size` examples with equal counts per class (the remainder to random classes), in original order."""
  rng = np.random.default_rng(seed)
  k = ds.num_classes
  per_class = np.full(k, size // k)
  per_class[rng.choice(k, size % k, replace=False)] += 1
  chosen = []
  for c in range(k):
    members = np.flatnonzero(ds.labels == c)
    if len(members) < per_class[c]:
      raise ValueError(f"{field}={size} needs {per_class[c]} examples of class {ds.class_names[c]!r}, "
                       f"which has only {len(members)}")
    chosen.append(rng.choice(members, per_class[c], replace=False))
  return ds.take(np.sort(np.concatenate(chosen)))


# Synthetic data.


def synthetic(num_train: int, num_test: int, num_classes: int, image_size: int, seed: int,
              class_weight: float = 0.4) -> tuple[Dataset, Dataset]:
  """Generated data: a shifted class template blended with a random per-example scene, plus noise.

  The class template carries `class_weight` of each image; the rest is a random smooth scene, so
  that, as in real photos, the class takes some learning and a stamped trigger is the easier cue.
  """
  max_shift = max(1, image_size // 8)
  side = image_size + 2 * max_shift
  templates = _smooth(np.random.default_rng([seed, 0]), num_classes, 4, side)
  names = tuple(f"class{i}" for i in range(num_classes))

  def split(n: int, stream: int) -> Dataset:
    rng = np.random.default_rng([seed, stream])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    rows = dy[:, None] + np.arange(image_size)
    cols = dx[:, None] + np.arange(image_size)
    images = templates[labels[:, None, None], rows[:, :, None], cols[:, None, :]]
    images = class_weight * images + (1 - class_weight) * _smooth(rng, n, 3, image_size)
    images = images * rng.uniform(0.8, 1.2, (n, 1, 1, 1)) + rng.uniform(-25, 25, (n, 1, 1, 1))
    images += rng.normal(0, 12, images.shape)
    return Dataset(np.clip(np.rint(images), 0, 255).astype(np.uint8), labels, names)

  return split(num_train, 1), split(num_test, 2)


def _smooth(rng: np.random.Generator, n: int, cells: int, side: int) -> np.ndarray:
  """`n` smooth random colour images: a cells x cells grid upscaled bicubically, float32 [n, side, side, 3]."""
  grids = rng.uniform(0, 255, (n, cells, cells, 3)).astype(np.uint8)
  bicubic = Image.Resampling.BICUBIC
  return np.stack([np.asarray(Image.fromarray(g).resize((side, side), bicubic)) for g in grids]).astype(np.float32)


# Image folders and tars of them.


def load_folder(path: str, cache_dir: str = "") -> tuple[Dataset, Dataset]:
  """An image folder (train/<class>/*.png|jpg, test/<class>/*) or a .tar.gz of one; decoded once, then cached."""
  src = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(src):
    raise FileNotFoundError(f"config.data.path={path!r} does not exist; expected an image folder "
                            "(train/<class>/*.jpg, test/<class>/*) or a .tar.gz of one")
  is_tar = os.path.isfile(src)
  if is_tar and not tarfile.is_tarfile(src):
    raise ValueError(f"config.data.path={path!r} is a file but not a tar archive; expected an image folder "
                     "or a .tar.gz of one")
  files = None if is_tar else _walk(src)
  stat = os.stat(src)
  # A tar is keyed by its size and mtime; a folder by every image's path, size and mtime.
  key_src = f"{src}:{stat.st_size}:{stat.st_mtime_ns}" if is_tar else repr((src, files))
  key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
  base = os.path.basename(src.rstrip(os.sep))
  for suffix in (".tar.gz", ".tgz", ".tar"):
    base = base[:-len(suffix)] if base.endswith(suffix) else base
  cache = os.path.join(cache_lib.root(cache_dir), f"{base}-{key}.npz")

  if os.path.exists(cache):
    logging.info("Reading cached arrays of %s from %s", path, cache)
    with np.load(cache) as z:
      names = tuple(str(s) for s in z["class_names"])
      return tuple(Dataset(z[f"{s}_images"], z[f"{s}_labels"], names) for s in SPLITS)

  if is_tar:
    blobs = _read_tar(src, path)
    layout = _layout(path, list(blobs))
    items = {s: [(c, (f"{path}: member {n}", blobs[n])) for c, n in layout[s]] for s in SPLITS}
  else:
    layout = _layout(path, [f for f, _, _ in files])
    items = {s: [(c, (os.path.join(path, n), os.path.join(src, n))) for c, n in layout[s]] for s in SPLITS}

  names = tuple(sorted({c for c, _ in items["train"]}))
  test_names = tuple(sorted({c for c, _ in items["test"]}))
  if names != test_names:
    raise ValueError(f"config.data.path={path!r}: train and test have different classes: "
                     f"{', '.join(names)} vs {', '.join(test_names)}")
  index = {c: i for i, c in enumerate(names)}
  arrays = {}
  for s in SPLITS:
    arrays[f"{s}_images"] = _decode_all([x for _, x in items[s]], f"{path} {s}")
    arrays[f"{s}_labels"] = np.array([index[c] for c, _ in items[s]], np.int32)
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
  except OSError as e:
    raise DataError(f"cannot create the cache directory {os.path.dirname(cache)} ({e.strerror}); set "
                    "config.data.cache_dir to a writable directory") from None
  tmp = f"{cache}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, class_names=np.array(names), **arrays)
  os.replace(tmp, cache)  # Atomic: a concurrent reader never sees half a file.
  logging.info("Cached the decoded arrays of %s in %s", path, cache)
  return tuple(Dataset(arrays[f"{s}_images"], arrays[f"{s}_labels"], names) for s in SPLITS)


def _read_tar(src: str, path: str) -> dict[str, bytes]:
  """Every image member of the tar at `src` by name, read in archive order (a .tar.gz cannot seek back cheaply)."""
  blobs: dict[str, bytes] = {}
  last = "none"
  try:
    with tarfile.open(src) as tar:
      for m in tar:
        if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS):
          blobs[m.name] = tar.extractfile(m).read()
        last = m.name
  except (EOFError, tarfile.TarError, OSError, zlib.error) as e:
    raise DataError(f"config.data.path={path!r} is truncated or damaged ({type(e).__name__}: {e or 'unexpected end'}; "
                    f"{len(blobs)} images read, the last intact member {last}); copy or download the archive "
                    "again") from None
  return blobs


def _walk(root: str) -> list[tuple[str, int, int]]:
  """(relative path, size, mtime) of every file under `root`, sorted."""
  out = []
  for d, _, names in os.walk(root):
    for n in names:
      st = os.stat(os.path.join(d, n))
      out.append((os.path.relpath(os.path.join(d, n), root), st.st_size, st.st_mtime_ns))
  return sorted(out)


def _layout(path: str, names: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
  """Sorted (class, file name) pairs per split, under the one directory holding train/ and test/."""
  found = {s: collections.defaultdict(list) for s in SPLITS}
  for name in names:
    parts = [p for p in name.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if (len(parts) < 3 or parts[-3] not in SPLITS or not name.lower().endswith(IMAGE_EXTENSIONS)
        or any(p.startswith((".", "__")) for p in parts)):  # Hidden files, __MACOSX/ and the like.
      continue
    found[parts[-3]]["/".join(parts[:-3])].append((parts[-2], name))
  roots = set(found["train"]) & set(found["test"])
  if not roots:
    raise ValueError(f"config.data.path={path!r} holds no image folder: no train/<class>/*.jpg with "
                     "test/<class>/* (.png, .jpg or .jpeg) found")
  if len(roots) > 1:
    shown = ", ".join(r or "." for r in sorted(roots)[:3]) + (", ..." if len(roots) > 3 else "")
    raise ValueError(f"config.data.path={path!r} holds several image folders ({shown}); point it at one")
  root = roots.pop()
  return {s: sorted(found[s][root]) for s in SPLITS}


def _decode(item: tuple[str, bytes | str]) -> np.ndarray:
  """One image file (name, then its bytes or its path) as uint8 RGB [H, W, 3]."""
  name, data = item
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # Pillow: UnidentifiedImageError (not an image), OSError "image file is truncated", and the like.
    raise DataError(f"{name} cannot be decoded as an image ({type(e).__name__}: {e}); replace or delete that "
                    "file (a folder's decoded arrays are cached, so this happens once)") from None


def _decode_all(items: list[tuple[str, bytes | str]], what: str) -> np.ndarray:
  """Decodes images of one shape into one uint8 array, in threads (Pillow decodes without the GIL)."""

  def chunk(start: int) -> list[np.ndarray]:
    return [_decode(x) for x in items[start:start + _CHUNK]]

  out = None
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for start, images in zip(range(0, len(items), _CHUNK), pool.map(chunk, range(0, len(items), _CHUNK))):
      for i, image in enumerate(images, start):
        if out is None:
          out = np.empty((len(items), *image.shape), np.uint8)
        if image.shape != out.shape[1:]:
          raise ValueError(f"{what}: images differ in shape ({image.shape} at #{i} vs {out.shape[1:]}); "
                           "resize them to one size first")
        out[i] = image
      if (start + len(images)) // _LOG_EVERY > start // _LOG_EVERY:
        logging.info("Decoded %d/%d images of %s", start + len(images), len(items), what)
  return out


# TensorFlow Datasets.


def load_tfds(name: str, data_dir: str = "") -> tuple[Dataset, Dataset]:
  """The train and test splits of a tfds dataset: prepared array_record data, else (with TensorFlow) downloaded."""
  folder = ("--config.data.source=folder --config.data.path=<an image folder or .tar.gz of one> (this project's "
            "CIFAR-10: ../shared/datasets/cifar10-jpeg.tar.gz, from the repository root)")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Slow import; only here.
  except ImportError as e:
    raise DataError(f"config.data.source='tfds' needs tensorflow_datasets ({e}); pip install -e '.[tfds]', or "
                    f"use {folder}") from None
  kwargs = dict(split=list(SPLITS), data_dir=data_dir or None, download=False)
  try:
    sources = tfds.data_source(name, **kwargs)
  except Exception:  # pylint: disable=broad-except  # Not prepared as array_record: download it, below.
    pass
  else:
    names = tuple(sources[0].dataset_info.features["label"].names)
    return tuple(Dataset(*_read_source(src), names) for src in sources)
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    where = builder.data_dir
  except Exception as e:  # pylint: disable=broad-except  # An unknown name, a broken install.
    raise DataError(f"tfds cannot load {name!r}: {_first_line(e)}; check config.data.name, or use {folder}") from None
  if importlib.util.find_spec("tensorflow") is None:
    raise DataError(f"tfds found no {name!r} prepared as array_record in {where}; without TensorFlow it reads "
                    "only that. Either pip install -e '.[tfds]' (TensorFlow: tfds downloads "
                    f"and prepares it, with internet), or put prepared data there (config.data.tfds_data_dir), or "
                    f"use {folder}")
  try:
    urls = list(builder.url_infos or {})
  except ModuleNotFoundError as e:
    raise DataError(f"tfds needs the module {e.name!r} to download {name!r}; pip install -e '.[tfds]' installs "
                    f"it, or use {folder}") from None
  if urls and (offline := _unreachable(urls[0])):
    raise DataError(f"tfds cannot download {name!r}: {offline}. Without network: {folder}; or put data tfds "
                    f"prepared elsewhere in {where} (config.data.tfds_data_dir)")
  try:
    splits, info = tfds.load(name, batch_size=-1, with_info=True, **{**kwargs, "download": True})
  except ModuleNotFoundError as e:
    raise DataError(f"tfds needs the module {e.name!r} to prepare {name!r}; pip install -e '.[tfds]' installs "
                    f"it, or use {folder}") from None
  except Exception as e:  # pylint: disable=broad-except  # A failed download or preparation.
    raise DataError(f"tfds could not download and prepare {name!r} in {where} ({_first_line(e)}); use {folder}") from e
  names = tuple(info.features["label"].names)
  return tuple(Dataset(d["image"], d["label"].astype(np.int32), names) for d in tfds.as_numpy(splits))


def _first_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
  """Why `url` cannot be fetched now (a few seconds at most, unlike tfds' retries), or None when it answers."""
  import requests  # pylint: disable=g-import-not-at-top  # A tfds dependency.
  try:
    requests.head(url, timeout=timeout, allow_redirects=True)
  except requests.RequestException as e:
    return f"{url} is unreachable ({type(e).__name__}; no network?)"
  return None


def _read_source(source) -> tuple[np.ndarray, np.ndarray]:
  """All records of a tfds data source as (uint8 images, int32 labels), read in batches."""
  n = len(source)
  images, labels = None, np.empty((n,), np.int32)
  for start in range(0, n, _CHUNK):
    records = source.__getitems__(list(range(start, min(start + _CHUNK, n))))
    if images is None:
      images = np.empty((n, *np.shape(records[0]["image"])), np.uint8)
    images[start:start + len(records)] = np.stack([r["image"] for r in records])
    labels[start:start + len(records)] = [r["label"] for r in records]
  return images, labels
