"""Tests for liptorch.data: file formats, error paths, splits and deterministic batching."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from liptorch import data as D
from liptorch.data import (BatchIterator, DatasetError, DatasetInfo, available_datasets,
                           dataset_info, load_dataset, read_idx, stratified_split)

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test sees the real system copy or a user's $LIPTORCH_DATA unless it asks."""
    monkeypatch.delenv("LIPTORCH_DATA", raising=False)
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", tmp_path / "no-system")


# --------------------------------------------------------------------------- writers

def idx_bytes(arr: np.ndarray, code: int = 0x08, magic_prefix: bytes = b"\x00\x00") -> bytes:
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = magic_prefix + bytes([code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + np.ascontiguousarray(arr, dtype=big).tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_idx_set(directory: Path, gz: bool, n_train=12, n_test=7, seed=0, size=28):
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    ytr = rng.integers(0, 10, n_train).astype(np.uint8)
    xte = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)
    yte = rng.integers(0, 10, n_test).astype(np.uint8)
    for name, arr in zip(IDX_NAMES, (xtr, ytr, xte, yte)):
        write_file(directory / name, idx_bytes(arr), gz)
    return xtr, ytr, xte, yte


def make_cifar10(directory: Path, per_batch=3, seed=0, protocol=2, meta=True):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(directory / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x,
                         b"filenames": [b"f%d.png" % i for i in range(per_batch)]}, fh, protocol=protocol)
        batches.append((x, y))
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        with open(directory / "batches.meta", "wb") as fh:
            pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, fh, protocol=protocol)
    xtr = np.concatenate([b[0] for b in batches[:5]])
    ytr = np.concatenate([b[1] for b in batches[:5]])
    return xtr, ytr, batches[5][0], np.array(batches[5][1])


def make_cifar100(directory: Path, n_train=8, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        fine[0] = 99
        coarse = [v // 5 for v in fine]
        with open(directory / name, "wb") as fh:
            pickle.dump({b"data": x, b"fine_labels": fine, b"coarse_labels": coarse}, fh, protocol=2)
        out += [x, np.array(fine)]
    with open(directory / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, fh, protocol=2)
    return tuple(out)


def assert_images_equal(x: torch.Tensor, u8: np.ndarray):
    expected = torch.from_numpy(u8.astype(np.float32) / np.float32(255.0))
    assert x.dtype == torch.float32
    assert torch.equal(x, expected)
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(u8))


# --------------------------------------------------------------------------- metadata

def test_metadata_without_files():
    assert set(available_datasets()) == {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100"}
    info = dataset_info("cifar10")
    assert isinstance(info, DatasetInfo)
    assert (info.channels, info.image_size, info.num_classes) == (3, (32, 32), 10)
    assert info.input_shape == (3, 32, 32) and len(info.mean) == 3 and info.augment == "crop-flip"
    assert info.class_names[0] == "airplane" and len(info.class_names) == 10
    assert dataset_info("fashion_mnist").name == "fashion-mnist"
    assert dataset_info("CIFAR-100").num_classes == 100
    for name in ("digits", "mnist", "fashion-mnist"):
        i = dataset_info(name)
        assert i.channels == 1 and len(i.mean) == 1 and i.augment is None
    with pytest.raises(ValueError, match="unknown data set"):
        dataset_info("imagenet")


# --------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("nested", [False, True])
def test_idx_round_trip(tmp_path, name, gz, nested):
    root = tmp_path / "data"
    target = root / name if nested else root
    xtr, ytr, xte, yte = make_idx_set(target, gz)
    s = load_dataset(name, data_dir=root)
    assert s.source == str(target) and s.val is None and s.info.name == name
    assert s.train[0].shape == (12, 1, 28, 28) and s.test[0].shape == (7, 1, 28, 28)
    assert_images_equal(s.train[0][:, 0], xtr)
    assert_images_equal(s.test[0][:, 0], xte)
    assert s.train[1].dtype == torch.int64
    assert torch.equal(s.train[1], torch.from_numpy(ytr.astype(np.int64)))
    assert torch.equal(s.test[1], torch.from_numpy(yte.astype(np.int64)))


def test_read_idx_other_dtypes_and_shapes(tmp_path):
    a = np.arange(-6, 18, dtype=np.int32).reshape(2, 3, 4) * 1000
    p = write_file(tmp_path / "a.idx", idx_bytes(a, 0x0C), gz=False)
    b = read_idx(p)
    assert b.dtype == np.int32 and b.shape == (2, 3, 4) and np.array_equal(a, b)
    f = np.linspace(-1, 1, 5)
    q = write_file(tmp_path / "f.idx", idx_bytes(f, 0x0E), gz=True)
    assert np.array_equal(read_idx(q), f)


def test_env_var_and_search_order(tmp_path, monkeypatch):
    env_root = tmp_path / "env"
    make_idx_set(env_root / "mnist", gz=True, seed=1)
    monkeypatch.setenv("LIPTORCH_DATA", str(env_root))
    s_env = load_dataset("mnist")
    assert s_env.source == str(env_root / "mnist")
    # An explicit data_dir comes first.
    xtr, *_ = make_idx_set(tmp_path / "mine", gz=False, seed=2)
    s_dir = load_dataset("mnist", data_dir=tmp_path / "mine")
    assert s_dir.source == str(tmp_path / "mine")
    assert_images_equal(s_dir.train[0][:, 0], xtr)
    # A data_dir with nothing in it falls through to the environment copy.
    assert load_dataset("mnist", data_dir=tmp_path / "empty").source == str(env_root / "mnist")
    # The system directory is the last resort.
    monkeypatch.delenv("LIPTORCH_DATA")
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", tmp_path / "sys")
    make_idx_set(tmp_path / "sys" / "mnist", gz=True, seed=3)
    assert load_dataset("mnist").source == str(tmp_path / "sys" / "mnist")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_missing_dataset_lists_every_place(tmp_path, monkeypatch, name):
    monkeypatch.setenv("LIPTORCH_DATA", str(tmp_path / "envroot"))
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", tmp_path / "sysroot")
    (tmp_path / "given").mkdir()
    with pytest.raises(DatasetError) as ei:
        load_dataset(name, data_dir=tmp_path / "given")
    msg = str(ei.value)
    bases = [tmp_path / "given", tmp_path / "given" / name,
             tmp_path / "envroot" / name, tmp_path / "sysroot" / name]
    for b in bases:
        assert f"{b}  [" in msg, (b, msg)
        if name.startswith("cifar"):
            sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
            assert f"{b / sub}  [" in msg
    assert "To get the data" in msg and "DIR" in msg
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in msg
    if name.startswith("cifar"):
        assert "python.tar.gz" in msg
    assert isinstance(ei.value, ValueError)


def test_missing_message_mentions_unset_env(tmp_path):
    with pytest.raises(DatasetError, match=r"\$LIPTORCH_DATA is not set"):
        load_dataset("mnist")


def test_incomplete_copy_is_reported_not_skipped(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "env" / "mnist", gz=True)
    monkeypatch.setenv("LIPTORCH_DATA", str(tmp_path / "env"))
    make_idx_set(tmp_path / "mine", gz=True)
    (tmp_path / "mine" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="incomplete copy.*missing t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=tmp_path / "mine")


def _corrupt_case(tmp_path, gz=False):
    root = tmp_path / "bad"
    make_idx_set(root, gz=gz)
    return root


def test_truncated_idx_raw(tmp_path):
    root = _corrupt_case(tmp_path)
    p = root / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"(?s)corrupt.*payload.*truncated.*Looked in"):
        load_dataset("mnist", data_dir=root)
    p.write_bytes(p.read_bytes()[:10])  # inside the header
    with pytest.raises(DatasetError, match="truncated IDX header"):
        load_dataset("mnist", data_dir=root)


def test_truncated_gzip(tmp_path):
    root = _corrupt_case(tmp_path, gz=True)
    p = root / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset("fashion-mnist", data_dir=root)


def test_trailing_bytes_rejected(tmp_path):
    root = _corrupt_case(tmp_path)
    p = root / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(DatasetError, match="trailing data"):
        load_dataset("mnist", data_dir=root)


@pytest.mark.parametrize("prefix,code,match", [(b"\x08\x03", 0x08, "magic"),
                                               (b"\x00\x00", 0x07, "dtype code")])
def test_wrong_magic(tmp_path, prefix, code, match):
    root = _corrupt_case(tmp_path)
    labels = np.zeros(12, dtype=np.uint8)
    header = prefix + bytes([code, 1]) + struct.pack(">I", 12)
    (root / "train-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    with pytest.raises(DatasetError, match=match):
        load_dataset("mnist", data_dir=root)


def test_wrong_dims_and_dtype(tmp_path):
    root = _corrupt_case(tmp_path)
    # Images stored as a 2-D array.
    (root / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((7, 784), np.uint8)))
    with pytest.raises(DatasetError, match=r"shape \(N, 28, 28\)"):
        load_dataset("mnist", data_dir=root)
    # Wrong image size.
    (root / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((7, 27, 28), np.uint8)))
    with pytest.raises(DatasetError, match="27, 28"):
        load_dataset("mnist", data_dir=root)
    # Labels with a non-uint8 dtype code.
    make_idx_set(root, gz=False)
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, np.int32), 0x0C))
    with pytest.raises(DatasetError, match="uint8 label file"):
        load_dataset("mnist", data_dir=root)


def test_count_mismatch(tmp_path):
    root = _corrupt_case(tmp_path)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(DatasetError, match="label count 11 .* does not match image count 12"):
        load_dataset("mnist", data_dir=root)


def test_label_out_of_range(tmp_path):
    root = _corrupt_case(tmp_path)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(12, 10, np.uint8)))
    with pytest.raises(DatasetError, match=r"labels outside \[0, 10\)"):
        load_dataset("mnist", data_dir=root)


# --------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_round_trip(tmp_path, nested, protocol):
    root = tmp_path / "c"
    target = root / "cifar-10-batches-py" if nested else root
    xtr, ytr, xte, yte = make_cifar10(target, protocol=protocol)
    s = load_dataset("cifar10", data_dir=root)
    assert s.source == str(target)
    assert s.train[0].shape == (15, 3, 32, 32) and s.test[0].shape == (3, 3, 32, 32)
    assert_images_equal(s.train[0], xtr.reshape(-1, 3, 32, 32))
    assert_images_equal(s.test[0], xte.reshape(-1, 3, 32, 32))
    # CHW order: the first 1024 bytes of a row are the red plane, row-major.
    assert s.train[0][0, 0, 0, 1].item() == pytest.approx(xtr[0, 1] / 255.0)
    assert s.train[0][0, 1, 0, 0].item() == pytest.approx(xtr[0, 1024] / 255.0)
    assert s.train[0][0, 2, 1, 0].item() == pytest.approx(xtr[0, 2048 + 32] / 255.0)
    assert torch.equal(s.train[1], torch.from_numpy(ytr.astype(np.int64)))
    assert torch.equal(s.test[1], torch.from_numpy(yte.astype(np.int64)))
    assert s.info.class_names == tuple(f"class{i}" for i in range(10))


def test_cifar10_without_meta_and_str_keys(tmp_path):
    d = tmp_path / "c10"
    make_cifar10(d, meta=False)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    with open(d / "test_batch", "wb") as fh:
        pickle.dump({"data": x, "labels": np.array([3, 9])}, fh)
    s = load_dataset("cifar10", data_dir=d)
    assert s.info.class_names == dataset_info("cifar10").class_names
    assert_images_equal(s.test[0], x.reshape(-1, 3, 32, 32))
    assert s.test[1].tolist() == [3, 9]


def test_cifar100_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPTORCH_DATA", str(tmp_path / "env"))
    xtr, ytr, xte, yte = make_cifar100(tmp_path / "env" / "cifar100" / "cifar-100-python")
    s = load_dataset("cifar100")
    assert s.train[0].shape == (8, 3, 32, 32) and s.test[0].shape == (5, 3, 32, 32)
    assert_images_equal(s.train[0], xtr.reshape(-1, 3, 32, 32))
    assert_images_equal(s.test[0], xte.reshape(-1, 3, 32, 32))
    assert s.train[1].tolist() == ytr.tolist() and s.train[1].max().item() == 99
    assert s.test[1].tolist() == yte.tolist()
    assert s.info.num_classes == 100 and s.info.class_names[99] == "fine99"
    assert dataset_info("cifar100").class_names is None  # static info is unchanged


def test_cifar_missing_batch_file(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    make_cifar10(d)
    (d / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-dict", "wrong-width", "no-labels",
                                    "label-count", "label-range", "wrong-dtype", "bad-meta"])
def test_cifar_corrupt(tmp_path, damage):
    d = tmp_path / "cifar-10-batches-py"
    make_cifar10(d)
    p = d / "data_batch_2"
    x = np.zeros((3, 3072), np.uint8)
    payload = {
        "garbage": b"this is not a pickle at all",
        "truncated": p.read_bytes()[:100],
        "not-dict": pickle.dumps([1, 2, 3], protocol=2),
        "wrong-width": pickle.dumps({b"data": np.zeros((3, 3071), np.uint8), b"labels": [0, 1, 2]}, protocol=2),
        "no-labels": pickle.dumps({b"data": x}, protocol=2),
        "label-count": pickle.dumps({b"data": x, b"labels": [0, 1]}, protocol=2),
        "label-range": pickle.dumps({b"data": x, b"labels": [0, 1, 10]}, protocol=2),
        "wrong-dtype": pickle.dumps({b"data": x.astype(np.float32), b"labels": [0, 1, 2]}, protocol=2),
        "bad-meta": None,
    }[damage]
    if damage == "bad-meta":
        (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    else:
        p.write_bytes(payload)
    with pytest.raises(DatasetError, match=r"(?s)corrupt.*Looked in"):
        load_dataset("cifar10", data_dir=tmp_path)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_pickle_cannot_run_code(tmp_path):
    d = tmp_path / "cifar-100-python"
    make_cifar100(d)
    marker = tmp_path / "pwned"
    (d / "train").write_bytes(pickle.dumps({b"data": _Evil(str(marker)), b"fine_labels": []}))
    with pytest.raises(DatasetError, match="refusing to load global"):
        load_dataset("cifar100", data_dir=tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------- digits and splits

def test_digits_shapes_values_and_fixed_stratified_split():
    a = load_dataset("digits")
    b = load_dataset("digits")
    xtr, ytr = a.train
    xte, yte = a.test
    assert xtr.shape == (1348, 1, 8, 8) and xte.shape == (449, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert 0.0 <= xtr.min().item() and xtr.max().item() == 1.0
    assert torch.equal(xtr * 16, (xtr * 16).round())  # pixel / 16
    for u, v in zip(a.train + a.test, b.train + b.test):
        assert torch.equal(u, v)
    from sklearn.datasets import load_digits
    full = load_digits()
    counts = np.bincount(full.target, minlength=10)
    test_counts = np.bincount(yte.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * 449 / 1797) < 1)
    assert np.array_equal(test_counts + np.bincount(ytr.numpy(), minlength=10), counts)
    # Train and test together are exactly the full data set (as a multiset of rows).
    allx = torch.cat([xtr, xte]).reshape(1797, 64) * 16
    ref = torch.from_numpy(full.data.astype(np.float32))
    key = lambda t: sorted(map(tuple, t.round().to(torch.int64).tolist()))
    assert key(allx) == key(ref)
    assert a.info.mean[0] == pytest.approx(xtr.mean().item(), abs=1e-4)
    assert a.source is None


def test_stratified_split_properties():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(3))]
    keep, held = stratified_split(labels, 0.2, seed=7)
    assert held.numel() == 20 and keep.numel() == 80
    assert torch.equal(torch.sort(torch.cat([keep, held])).values, torch.arange(100))
    assert torch.bincount(labels[held], minlength=3).tolist() == [10, 6, 4]
    keep2, held2 = stratified_split(labels, 0.2, seed=7)
    assert torch.equal(held, held2) and torch.equal(keep, keep2)
    assert not torch.equal(held, stratified_split(labels, 0.2, seed=8)[1])
    assert stratified_split(labels, 0.0)[1].numel() == 0
    assert stratified_split(labels, 0.001)[1].numel() == 1
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0)


def test_val_split_and_limits(tmp_path):
    full = load_dataset("digits")
    s = load_dataset("digits", val_fraction=0.1, seed=1)
    assert s.val is not None
    assert s.train[0].shape[0] + s.val[0].shape[0] == 1348 and s.val[0].shape[0] == 135
    assert torch.equal(s.test[0], full.test[0])
    # val and train rows together are the original training rows.
    joined = torch.cat([s.train[0], s.val[0]]).reshape(-1, 64)
    key = lambda t: sorted(map(tuple, (t * 16).round().to(torch.int64).tolist()))
    assert key(joined) == key(full.train[0].reshape(-1, 64))
    same = load_dataset("digits", val_fraction=0.1, seed=1)
    other = load_dataset("digits", val_fraction=0.1, seed=2)
    assert torch.equal(same.val[0], s.val[0]) and not torch.equal(other.val[0], s.val[0])
    lim = load_dataset("digits", limit_train=100, limit_test=30)
    assert torch.equal(lim.train[0], full.train[0][:100]) and torch.equal(lim.test[1], full.test[1][:30])
    lv = load_dataset("digits", limit_train=100, val_fraction=0.2)
    assert lv.train[0].shape[0] == 80 and lv.val[0].shape[0] == 20
    with pytest.raises(ValueError):
        load_dataset("digits", limit_train=0)
    with pytest.raises(ValueError):
        load_dataset("digits", val_fraction=1.0)


# --------------------------------------------------------------------------- batching

def _collect(it, epoch, **kw):
    return list(it.batches(epoch, **kw))


def test_batches_deterministic_and_epoch_dependent():
    x = torch.rand(53, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(53)
    it = BatchIterator(x, y, batch_size=8, seed=11)
    assert len(it) == 7
    rng_before = torch.get_rng_state()
    e3 = _collect(it, 3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    torch.manual_seed(12345)  # and not consulted
    e3_again = _collect(BatchIterator(x, y, batch_size=8, seed=11), 3)
    assert len(e3) == 7 and [b[1].shape[0] for b in e3] == [8] * 6 + [5]
    for (xa, ya), (xb, yb) in zip(e3, e3_again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    seen = torch.cat([b[1] for b in e3])
    assert torch.equal(torch.sort(seen).values, y)  # every sample exactly once
    for xb, yb in e3:
        assert torch.equal(xb, x[yb])  # x and y stay aligned
    e4 = torch.cat([b[1] for b in _collect(it, 4)])
    assert not torch.equal(seen, e4)
    other_seed = torch.cat([b[1] for b in _collect(BatchIterator(x, y, 8, seed=12), 3)])
    assert not torch.equal(seen, other_seed)
    # Mid-epoch resume.
    tail = _collect(it, 3, start=4)
    assert len(tail) == 3 and all(torch.equal(a[1], b[1]) for a, b in zip(tail, e3[4:]))
    # No shuffle: natural order; drop_last drops the partial batch.
    ns = BatchIterator(x, y, batch_size=8, shuffle=False, drop_last=True)
    assert len(ns) == 6
    assert torch.equal(torch.cat([b[1] for b in _collect(ns, 0)]), torch.arange(48))


@pytest.mark.parametrize("n,world", [(100, 4), (103, 4), (5, 8)])
def test_sharding_disjoint_and_covering(n, world):
    x = torch.zeros(n, 2)
    y = torch.arange(n)
    per_rank = []
    for r in range(world):
        it = BatchIterator(x, y, batch_size=7, seed=3, rank=r, world_size=world)
        per_rank.append(torch.cat([b[1] for b in _collect(it, 2)]))
        assert len(it) == len(BatchIterator(x, y, 7, seed=3, rank=0, world_size=world))
    lengths = {t.numel() for t in per_rank}
    assert lengths == {-(-n // world)}
    allidx = torch.cat(per_rank)
    assert set(allidx.tolist()) == set(range(n))  # covering
    pad = allidx.numel() - n
    assert pad == (-n) % world
    counts = torch.bincount(allidx, minlength=n)
    assert counts.sum().item() == n + pad and (counts >= 1).all()
    if pad == 0:
        assert (counts == 1).all()  # disjoint
    else:
        assert (counts > 1).sum().item() <= pad
    # drop_last: strictly disjoint, equal length, tail dropped.
    dl = [torch.cat([b[1] for b in _collect(BatchIterator(x, y, 1, seed=3, rank=r, world_size=world,
                                                          drop_last=True), 2)] or [torch.zeros(0, dtype=torch.long)])
          for r in range(world)]
    assert {t.numel() for t in dl} == {n // world}
    cat = torch.cat(dl)
    assert cat.unique().numel() == cat.numel()


def _variants(img: torch.Tensor, pad: int):
    """All crops (offsets 0..2*pad) of the zero-padded image, unflipped and flipped."""
    c, h, w = img.shape
    p = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = p[:, dy:dy + h, dx:dx + w]
            out += [(dy, dx, False, crop), (dy, dx, True, crop.flip(-1))]
    return out


def test_crop_flip_is_a_real_crop_and_deterministic():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(40, 3, 10, 10, generator=g) * 0.9 + 0.1  # strictly positive, so zeros come from padding
    y = torch.arange(40)
    it = BatchIterator(x, y, batch_size=16, augment="crop-flip", seed=5)
    batches = _collect(it, 1)
    again = _collect(BatchIterator(x, y, batch_size=16, augment="crop-flip", seed=5), 1)
    offsets, flips = set(), set()
    for (xb, yb), (xb2, _) in zip(batches, again):
        assert xb.shape == (yb.numel(), 3, 10, 10) and xb.dtype == torch.float32
        assert xb.min().item() >= 0.0 and xb.max().item() <= 1.0
        assert torch.equal(xb, xb2)
        for img, label in zip(xb, yb):
            match = [(dy, dx, f) for dy, dx, f, v in _variants(x[label], 4) if torch.equal(v, img)]
            assert len(match) == 1, "output must be exactly one crop/flip of its source image"
            offsets.add(match[0][:2])
            flips.add(match[0][2])
    assert len(offsets) > 10 and flips == {False, True}
    other = _collect(it, 2)
    assert not all(torch.equal(a[0], x[a[1]]) for a in other)
    # With a fixed order, the augmentation itself still changes from epoch to epoch.
    fixed = BatchIterator(x, y, batch_size=16, shuffle=False, augment="crop-flip", seed=5)
    a1, a2 = torch.cat([b[0] for b in _collect(fixed, 1)]), torch.cat([b[0] for b in _collect(fixed, 2)])
    assert not torch.equal(a1, a2)
    assert torch.equal(a1, torch.cat([b[0] for b in _collect(fixed, 1)]))


def test_flip_only_and_validation():
    x = torch.rand(32, 1, 5, 6, generator=torch.Generator().manual_seed(2))
    y = torch.arange(32)
    it = BatchIterator(x, y, batch_size=32, augment="flip", shuffle=False, seed=0)
    (xb, yb), = _collect(it, 0)
    same = (xb == x).flatten(1).all(1)
    mirrored = (xb == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    with pytest.raises(ValueError):
        BatchIterator(x, y, 4, augment="rotate")
    with pytest.raises(ValueError):
        BatchIterator(x.reshape(32, -1), y, 4, augment="flip")
    with pytest.raises(ValueError):
        BatchIterator(x, y[:-1], 4)
    with pytest.raises(ValueError):
        BatchIterator(x, y, 4, rank=2, world_size=2)
    with pytest.raises(ValueError):
        list(it.batches(-1))


# --------------------------------------------------------------------------- the real thing

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", REAL_FASHION.parent)
    s = load_dataset("fashion-mnist")
    assert s.source == str(REAL_FASHION)
    assert s.train[0].shape == (60000, 1, 28, 28) and s.test[0].shape == (10000, 1, 28, 28)
    assert s.train[0].dtype == torch.float32 and s.train[1].dtype == torch.int64
    assert 0.0 <= s.train[0].min().item() and s.train[0].max().item() <= 1.0
    assert torch.bincount(s.train[1]).tolist() == [6000] * 10
    assert torch.bincount(s.test[1]).tolist() == [1000] * 10
    assert s.train[0].mean().item() == pytest.approx(s.info.mean[0], abs=1e-4)
