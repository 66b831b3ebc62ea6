import gzip

import numpy as np
import pytest

from rais_jax.experiments import data


def _write_idx(path, array, code):
  header = bytes([0, 0, code, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  body = array.astype(array.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + body)


def _fashion_dir(root, n_train=12, n_test=5, gz=True):
  rng = np.random.default_rng(0)
  suffix = ".gz" if gz else ""
  arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
            "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
  for name, a in arrays.items():
    _write_idx(root / f"{name}{suffix}", a.astype(np.uint8), 0x08)
  return arrays


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B),
                                        (np.int32, 0x0C), (np.float32, 0x0D),
                                        (np.float64, 0x0E)])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, dtype, code, gz):
  a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
  if dtype == np.uint8:
    a = np.abs(a).astype(dtype)
  path = tmp_path / ("a.idx.gz" if gz else "a.idx")
  _write_idx(path, a, code)
  out = data.read_idx(path)
  assert out.dtype == np.dtype(dtype) and out.dtype.isnative
  np.testing.assert_array_equal(out, a)


def test_read_idx_errors(tmp_path):
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(bad)
  short = tmp_path / "short"
  _write_idx(short, np.arange(10, dtype=np.uint8), 0x08)
  short.write_bytes(short.read_bytes()[:-3])
  with pytest.raises(ValueError, match="bytes"):
    data.read_idx(short)


def test_fashion_mnist_from_dir_env_and_errors(tmp_path, monkeypatch):
  monkeypatch.delenv("RAIS_DATA_DIR", raising=False)
  arrays = _fashion_dir(tmp_path)
  got = data.load_fashion_mnist(tmp_path)
  assert got["x_train"].shape == (12, 28, 28) and got["x_train"].dtype == np.float32
  np.testing.assert_allclose(got["x_train"], arrays["train-images-idx3-ubyte"] / 255.0)
  np.testing.assert_array_equal(got["y_test"], arrays["t10k-labels-idx1-ubyte"])
  # RAIS_DATA_DIR with a fashion-mnist subdirectory, uncompressed files.
  sub = tmp_path / "env" / "fashion-mnist"
  sub.mkdir(parents=True)
  _fashion_dir(sub, gz=False)
  monkeypatch.setenv("RAIS_DATA_DIR", str(tmp_path / "env"))
  assert data.load_dataset("fashion-mnist")["y_train"].shape == (12,)
  monkeypatch.setenv("RAIS_DATA_DIR", str(tmp_path / "nowhere"))
  monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.load_fashion_mnist(tmp_path / "empty")


def test_npz_loading_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  good = {"x_train": rng.normal(size=(8, 3)), "y_train": np.arange(8) % 2,
          "x_test": rng.normal(size=(4, 3)), "y_test": np.arange(4) % 2}
  np.savez(tmp_path / "good.npz", **good)
  got = data.load_dataset(f"npz:{tmp_path / 'good.npz'}")
  assert got["x_train"].dtype == np.float32 and got["y_train"].dtype == np.int32
  assert data.num_classes(got) == 2
  cases = {
      "missing": ({k: v for k, v in good.items() if k != "y_test"}, "lacks arrays"),
      "float_labels": ({**good, "y_train": good["y_train"] + 0.5}, "integer class labels"),
      "negative": ({**good, "y_test": -good["y_test"] - 1}, "negative labels"),
      "lengths": ({**good, "y_train": good["y_train"][:5]}, "same n"),
      "shapes": ({**good, "x_test": rng.normal(size=(4, 5))}, "differ in shape"),
      "nan": ({**good, "x_train": np.full((8, 3), np.nan)}, "non-finite"),
  }
  for name, (arrays, message) in cases.items():
    np.savez(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(ValueError, match=message):
      data.load_npz(tmp_path / f"{name}.npz")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_npz(tmp_path / "absent.npz")
  (tmp_path / "text.npz").write_text("x_train,y_train\n1,0\n")
  with pytest.raises(ValueError, match="not an .npz archive"):
    data.load_npz(tmp_path / "text.npz")
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_dataset("cifar")
