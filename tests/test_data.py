"""Tests for diffenc_jax.data: fixed splits, IDX parsing, TFDS (mocked) and step-pure batches."""

import gzip
import importlib.util
import pathlib
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffenc_jax import data, datasets


def _config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(name="mnist5k", tfds_name="", data_dir="", image_size=0, num_test=0)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _row_hashes(examples: np.ndarray) -> set:
  return {row.tobytes() for row in examples.reshape(len(examples), -1)}


def _assert_split(config, num_train, num_test, shape, exact_range):
  """Shapes, dtypes, range within [-1, 1] and disjoint train/test."""
  x_train, y_train = data.load_eval_split(config, "train")
  x_test, y_test = data.load_eval_split(config, "test")
  assert x_train.shape == (num_train, *shape) and x_test.shape == (num_test, *shape)
  assert y_train.shape == (num_train,) and y_test.shape == (num_test,)
  assert x_train.dtype == x_test.dtype == np.float32
  assert y_train.dtype == y_test.dtype == np.int32
  for x in (x_train, x_test):
    assert -1 <= x.min() and x.max() <= 1
    if exact_range:
      assert x.min() == -1 and x.max() == 1
  assert not _row_hashes(x_train) & _row_hashes(x_test)
  return x_train, y_train, x_test, y_test


def test_mnist5k_fixed_disjoint_split():
  config = _config()
  _, _, x_test, y_test = _assert_split(config, 4500, 500, (28, 28, 1), exact_range=True)
  assert set(y_test.tolist()) == set(range(10))
  x_again, y_again = data.load_eval_split(config, "test")
  np.testing.assert_array_equal(x_again, x_test)
  np.testing.assert_array_equal(y_again, y_test)
  assert data.get_info(config) == data.DatasetInfo("mnist5k", (28, 28, 1), 4500, 500, 10, True)


@pytest.mark.parametrize("name, num_train, num_test, shape, exact_range", [
    ("digits", 1500, 297, (8, 8, 1), True),
    ("toy2d", 8000, 2000, (2,), False),
])
def test_small_datasets(name, num_train, num_test, shape, exact_range):
  _, y_train, _, _ = _assert_split(_config(name=name), num_train, num_test, shape, exact_range)
  info = data.get_info(_config(name=name))
  assert (info.shape, info.is_image) == (shape, len(shape) == 3)
  assert set(y_train.tolist()) == set(range(info.num_classes))


def test_resize_and_num_test():
  native, _ = data.load_eval_split(_config(name="digits"), "test")
  upscaled, _ = data.load_eval_split(_config(name="digits", image_size=32, num_test=10), "test")
  np.testing.assert_array_equal(upscaled, native[:10].repeat(4, 1).repeat(4, 2))
  bilinear, _ = data.load_eval_split(_config(image_size=32, num_test=7), "test")
  assert bilinear.shape == (7, 32, 32, 1) and -1 <= bilinear.min() and bilinear.max() <= 1
  assert data.get_info(_config(image_size=32, num_test=7)).shape == (32, 32, 1)


def _write_idx(path: pathlib.Path, array: np.ndarray, type_byte: int = 0x08):
  header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
    f.write(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, suffix):
  rng = np.random.RandomState(1)
  split_arrays = {}
  for split, n in (("train", 6), ("t10k", 3)):
    images = rng.randint(0, 256, size=(n, 4, 5)).astype(np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.randint(0, 10, size=n).astype(np.uint8)
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", images)
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", labels)
    split_arrays["train" if split == "train" else "test"] = images, labels
  config = _config(name="idx", data_dir=str(tmp_path))
  for split, (images, labels) in split_arrays.items():
    x, y = data.load_eval_split(config, split)
    assert x.shape == images.shape + (1,) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], images.astype(np.float32) / np.float32(127.5) - 1)
    np.testing.assert_array_equal(y, labels)
    assert x.min() == -1 and x.max() == 1
  assert data.get_info(config).shape == (4, 5, 1)
  with pytest.raises(ValueError, match="exceeds the 3 test examples"):
    data.load_eval_split(_config(name="idx", data_dir=str(tmp_path), num_test=4), "test")


def test_read_idx_big_endian_and_errors(tmp_path):
  values = np.arange(-6, 6, dtype=np.int32).reshape(2, 3, 2) * 70_000
  _write_idx(tmp_path / "ints.gz", values, type_byte=0x0C)
  np.testing.assert_array_equal(datasets.read_idx(str(tmp_path / "ints.gz")), values)
  (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # 3 of 5 bytes
  with pytest.raises(ValueError, match="do not match"):
    datasets.read_idx(str(tmp_path / "bad"))
  (tmp_path / "png").write_bytes(b"\x89PNG....")
  with pytest.raises(ValueError, match="not an IDX file"):
    datasets.read_idx(str(tmp_path / "png"))


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
  config = _config(name="tfds", tfds_name="mnist", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="tfds build mnist") as error:
    data.load_eval_split(config, "test")
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("tfds_name, image_size, shape", [
    ("mnist", 0, (28, 28, 1)),
    ("cifar10", 64, (64, 64, 3)),
])
def test_tfds_mocked(tfds_name, image_size, shape):
  config = _config(name="tfds", tfds_name=tfds_name, image_size=image_size, num_test=12)
  with tfds.testing.mock_data(num_examples=20):
    x, y = data.load_eval_split(config, "test")
    assert x.shape == (12, *shape) and x.dtype == np.float32 and y.dtype == np.int32
    assert -1 <= x.min() < x.max() <= 1 and set(y.tolist()) <= set(range(10))
    assert data.get_info(config) == data.DatasetInfo(tfds_name, shape, 20, 12, 10, True)
    batches = data.TrainBatches(config, batch_size=8, seed=0)
    batch = batches.get(3)
    assert batch["image"].shape == (8, *shape) and batch["label"].shape == (8,)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"], batches.get(3)["image"])


def test_train_batches_pure_in_step():
  config = _config(name="digits")
  a = data.TrainBatches(config, batch_size=128, seed=3)
  b = data.TrainBatches(config, batch_size=128, seed=3)
  assert a.steps_per_epoch == 1500 // 128
  for step in (0, 40, 5):  # out of order: nothing depends on what was read before
    for key in ("image", "label"):
      np.testing.assert_array_equal(a.get(step)[key], b.get(step)[key])
  x_train, y_train = data.load_eval_split(config, "train")
  np.testing.assert_array_equal(a.get(7)["image"], x_train[a.indices(7)])
  np.testing.assert_array_equal(a.get(7)["label"], y_train[a.indices(7)])
  other_seed = data.TrainBatches(config, batch_size=128, seed=4)
  assert not np.array_equal(a.indices(0), other_seed.indices(0))


def test_train_batches_epochs():
  batches = data.TrainBatches(_config(name="digits"), batch_size=100, seed=0)
  per_epoch = batches.steps_per_epoch
  for epoch in range(2):
    seen = np.concatenate([batches.indices(epoch * per_epoch + i) for i in range(per_epoch)])
    assert len(np.unique(seen)) == len(seen) == per_epoch * 100  # each example at most once
  assert not np.array_equal(batches.indices(0), batches.indices(per_epoch))  # fresh permutation


@pytest.mark.parametrize("process_count", [2, 4])
def test_train_batches_processes_split_global_batch(process_count):
  config = _config(name="digits")
  whole = data.TrainBatches(config, batch_size=64, seed=1)
  for step in (0, 30):
    local = [data.TrainBatches(config, batch_size=64, seed=1, process_index=p,
                               process_count=process_count).get(step)
             for p in range(process_count)]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole.get(step)[key])


def test_train_batches_iterator_matches_get():
  batches = data.TrainBatches(_config(name="toy2d"), batch_size=32, seed=0)
  iterator = batches.iterate(start_step=248)  # crosses the epoch boundary at 250
  for step in range(248, 256):
    batch = next(iterator)
    np.testing.assert_array_equal(batch["image"], batches.get(step)["image"])
    np.testing.assert_array_equal(batch["label"], batches.get(step)["label"])


@pytest.mark.parametrize("overrides", [
    dict(name="cifar"),
    dict(name="tfds", tfds_name="imagenet"),
    dict(name="tfds", tfds_name="mnist", data_dir="/nonexistent/tfds"),
    dict(name="idx"),
    dict(name="idx", data_dir="/nonexistent/idx"),
    dict(name="idx", data_dir="EMPTY_DIR"),
    dict(image_size=30),
    dict(name="toy2d", image_size=28),
    dict(num_test=-1),
    dict(num_test=501),
])
def test_validate_rejects_bad_config(tmp_path, overrides):
  if overrides.get("data_dir") == "EMPTY_DIR":
    overrides = dict(overrides, data_dir=str(tmp_path))
  with pytest.raises(ValueError) as error:
    data.validate_data_config(_config(**overrides))
  assert "\n" not in str(error.value)


def test_bad_batch_arguments_and_default_config():
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.TrainBatches(_config(name="digits"), batch_size=10, seed=0, process_count=3)
  with pytest.raises(ValueError, match="exceeds"):
    data.TrainBatches(_config(name="digits"), batch_size=2000, seed=0)
  path = pathlib.Path(__file__).parents[1] / "configs" / "default.py"
  spec = importlib.util.spec_from_file_location("default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data.validate_data_config(module.get_config().data)


def test_random_shift_translates_each_image_with_edge_padding():
  import jax
  s, n, h, w = 2, 64, 7, 9
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, n // 2, h, w, 3)).astype(np.float32)  # leading (E, B) axes
  out = np.asarray(jax.jit(data.random_shift, static_argnums=2)(jax.random.key(0), images, s))
  assert out.shape == images.shape
  padded = np.pad(images.reshape(n, h, w, 3), ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
  candidates = {(dy, dx): padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * s + 1)
                for dx in range(2 * s + 1)}
  used = set()
  for i, got in enumerate(out.reshape(n, h, w, 3)):
    match = [o for o, c in candidates.items() if np.array_equal(c[i], got)]
    assert len(match) == 1, f"example {i} is no single shift of its input"
    used.add(match[0])
  assert len(used) > 10  # 64 draws over 25 shifts: the offsets really vary
  assert (s, s) in candidates and np.array_equal(candidates[(s, s)], images.reshape(n, h, w, 3))
  assert data.random_shift(jax.random.key(0), images, 0) is images
  # return_offsets: the same images, and each one's shift as (dy + s)(2s + 1) + (dx + s)
  again, offsets = jax.jit(data.random_shift, static_argnums=(2, 3))(jax.random.key(0), images,
                                                                     s, True)
  np.testing.assert_array_equal(np.asarray(again), out)
  assert offsets.shape == (2, n // 2)
  for i, (got, code) in enumerate(zip(out.reshape(n, h, w, 3), np.asarray(offsets).ravel())):
    dy, dx = divmod(int(code), 2 * s + 1)
    assert np.array_equal(candidates[(dy, dx)][i], got)
  same, zero = data.random_shift(jax.random.key(0), images, 0, return_offsets=True)
  assert same is images and zero.shape == (2, n // 2) and not np.any(zero)
  assert data.unshifted_offset(s) == s * (2 * s + 1) + s  # (dy, dx) = (0, 0)
  # random_shift_where: the same shifts where picked, the input elsewhere; `moved` marks the
  # picked images whose shift is not (0, 0)
  pick = np.arange(n).reshape(2, n // 2) % 3 == 0
  where, moved = data.random_shift_where(jax.random.key(0), images, s, pick)
  np.testing.assert_array_equal(moved, pick & (np.asarray(offsets) != data.unshifted_offset(s)))
  np.testing.assert_array_equal(np.asarray(where), np.where(pick[..., None, None, None], out,
                                                            images))
  assert 0 < int(moved.sum()) < n // 2  # moved and unmoved images both occur
  _, moved_all = data.random_shift_where(jax.random.key(0), images, s)
  np.testing.assert_array_equal(moved_all, np.asarray(offsets) != data.unshifted_offset(s))


def _idx_dir(path: pathlib.Path, damage: str) -> pathlib.Path:
  """A valid IDX folder (train 6, test 3 images of 28x28) with one kind of damage."""
  rng = np.random.RandomState(0)
  path.mkdir()
  for split, n in (("train", 6), ("t10k", 3)):
    size = 20 if damage == "test_20x20" and split == "t10k" else 28
    n = 0 if damage == "no_images" else n
    images = rng.randint(0, 256, size=(n, size, size)).astype(np.uint8)
    labels = rng.randint(0, 10, size=n + (damage == "label_count" and split == "train"))
    type_byte = 0x08
    if damage == "int32_pixels":
      images, type_byte = images.astype(np.int32), 0x0C
    _write_idx(path / f"{split}-images-idx3-ubyte.gz", images, type_byte)
    _write_idx(path / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8))
  images_gz = path / "train-images-idx3-ubyte.gz"
  if damage == "truncated":
    images_gz.write_bytes(images_gz.read_bytes()[:-40])
  if damage == "magic":
    raw = bytearray(gzip.decompress(images_gz.read_bytes()))
    raw[2] = 0x42
    images_gz.write_bytes(gzip.compress(bytes(raw)))
  return path


@pytest.mark.parametrize("damage, message", [
    ("truncated", "train-images-idx3-ubyte.gz: unreadable (EOFError"),
    ("magic", "not an IDX file (magic bytes 00004203)"),
    ("label_count", "labels (7,) do not match 6 images"),
    ("no_images", "holds no images"),
    ("int32_pixels", "expected uint8 images"),
    ("test_20x20", "the test split's examples have shape (20, 20, 1), the train split's "
                   "(28, 28, 1)"),
])
def test_bad_idx_files_stop_in_one_line_before_the_workdir(tmp_path, damage, message):
  """Each used to be a 23-37-line traceback after the workdir was created (20x20 test images
  even trained 4 rounds, then crashed in flax)."""
  from configs import tiny
  from diffenc_jax import train
  config = tiny.get_config()
  config.data.name, config.data.num_test = "idx", 0
  config.data.data_dir = str(_idx_dir(tmp_path / "idx", damage))
  config.train.batch_size = 4
  workdir = tmp_path / "run"
  with pytest.raises(train.UsageError) as error:
    train.train_and_evaluate(config, str(workdir))
  assert message in str(error.value) and "\n" not in str(error.value)
  assert not workdir.exists()
