"""Image classification data sets as in-memory tensors, plus deterministic batching.

Every loader returns float32 images of shape ``(N, C, H, W)`` with values in
``[0, 1]`` and int64 labels.  Nothing is normalised here: models that want a
centred input subtract :attr:`DatasetInfo.mean` themselves, so that the
Lipschitz bound of the whole pipeline is accounted for in one place.

Supported data sets (see :func:`available_datasets`):

``digits``
    scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no
    download).  Pixels are divided by 16.  The train/test split is a fixed
    stratified 75 % / 25 % split.
``mnist``, ``fashion-mnist``
    The official IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``), each either gzipped (``.gz``) or raw.
``cifar10``, ``cifar100``
    The official "python version" pickle batches, either directly in a
    directory or in its ``cifar-10-batches-py`` / ``cifar-100-python``
    sub-directory.

Search order for the file-based data sets (first match wins):

1. ``data_dir`` itself, then ``data_dir/<name>`` (when ``data_dir`` is given);
2. ``$LIPTORCH_DATA/<name>`` (``LIPTORCH_DATA`` may hold several directories
   separated by ``os.pathsep``);
3. ``/usr/share/datasets/<name>`` (where Debian's ``dataset-fashion-mnist``
   package installs Fashion-MNIST).

If one of these groups holds an incomplete copy (some files present, some
missing) the loader stops there with an error instead of silently falling
through to another copy.

About pickles: the CIFAR files are Python pickles.  They are only read from the
directories listed above, i.e. places the user pointed at, and they are read
with a restricted unpickler that only resolves the handful of numpy / builtin
callables needed to rebuild arrays; any other global (``os.system`` and the
like) makes the load fail with :class:`DatasetError` before anything is called.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "Splits",
    "BatchIterator",
    "available_datasets",
    "dataset_info",
    "load_dataset",
    "read_idx",
    "stratified_split",
    "SYSTEM_DATA_DIR",
]

#: Directory where distribution packages put data sets (``/usr/share/datasets/<name>``).
#: Looked up at call time, so it can be redirected (e.g. in tests).
SYSTEM_DATA_DIR = Path("/usr/share/datasets")

#: Environment variable naming extra data roots (``$LIPTORCH_DATA/<name>``).
ENV_VAR = "LIPTORCH_DATA"


class DatasetError(ValueError):
    """A data set is missing, incomplete or corrupt.

    The message names every place that was searched and how to get the data.
    """


# --------------------------------------------------------------------------- metadata

@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set.

    ``mean`` is the per-channel mean of the (full, official) training images in
    ``[0, 1]`` units, for models that subtract it.  ``augment`` is the default
    augmentation for :class:`BatchIterator` (``"crop-flip"`` or ``None``).
    ``class_names`` may be ``None`` when it is only known from the data files
    (CIFAR-100); :func:`load_dataset` fills it in from the ``meta`` file then.
    """

    name: str
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    class_names: Optional[tuple[str, ...]] = None
    mean: tuple[float, ...] = ()
    augment: Optional[str] = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.channels, *self.image_size)


_TEN_DIGITS = tuple(str(i) for i in range(10))

# Means: digits is measured on this module's fixed training split (checked by a
# test); the others are the usual published per-channel means of the official
# training sets (Fashion-MNIST is re-checked against the real files in a test
# when they are installed).
_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, (8, 8), 10, _TEN_DIGITS, (0.3054,), None),
    "mnist": DatasetInfo("mnist", 1, (28, 28), 10, _TEN_DIGITS, (0.1307,), None),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 1, (28, 28), 10,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (0.2860,), None),
    "cifar10": DatasetInfo(
        "cifar10", 3, (32, 32), 10,
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465), "crop-flip"),
    "cifar100": DatasetInfo("cifar100", 3, (32, 32), 100, None,
                            (0.5071, 0.4865, 0.4409), "crop-flip"),
}

_ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar-100": "cifar100", "cifar_100": "cifar100",
}


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"data set name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _INFO:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    return key


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` and :func:`dataset_info`."""
    return list(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Metadata of ``name`` without reading any data file."""
    return _INFO[_canonical(name)]


@dataclass
class Splits:
    """Result of :func:`load_dataset`: ``(x, y)`` pairs and metadata.

    ``val`` is ``None`` when no validation split was requested.  ``source`` is
    the directory the files were read from (``None`` for ``digits``).
    """

    train: tuple[torch.Tensor, torch.Tensor]
    val: Optional[tuple[torch.Tensor, torch.Tensor]]
    test: tuple[torch.Tensor, torch.Tensor]
    info: DatasetInfo
    source: Optional[str] = None


# --------------------------------------------------------------------------- locating files

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR100_FILES = ("train", "test")

_SUBDIR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

_HOWTO = {
    "mnist": ("download the four official MNIST IDX files ({files}, gzipped or not; "
              "http://yann.lecun.com/exdb/mnist/ or one of its mirrors) into DIR"),
    "fashion-mnist": ("on Debian/Ubuntu run `apt-get install dataset-fashion-mnist` "
                      "(installs {system}), or download the four official IDX files ({files}, "
                      "gzipped or not; https://github.com/zalandoresearch/fashion-mnist) into DIR"),
    "cifar10": ("download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract "
                "it into DIR (giving DIR/cifar-10-batches-py/{files})"),
    "cifar100": ("download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract "
                 "it into DIR (giving DIR/cifar-100-python/{files})"),
}


def _required_files(name: str) -> tuple[str, ...]:
    return {"mnist": _IDX_FILES, "fashion-mnist": _IDX_FILES,
            "cifar10": _CIFAR10_FILES, "cifar100": _CIFAR100_FILES}[name]


def _candidate_groups(name: str, data_dir) -> list[tuple[str, list[Path]]]:
    """Ordered ``(source label, directories)`` groups to search."""
    groups: list[tuple[str, list[Path]]] = []
    sub = _SUBDIR.get(name)

    def expand(dirs: Sequence[Path]) -> list[Path]:
        out: list[Path] = []
        for d in dirs:
            out.append(d)
            if sub is not None:
                out.append(d / sub)
        return out

    if data_dir is not None:
        d = Path(os.path.expanduser(os.fspath(data_dir)))
        groups.append(("data_dir", expand([d, d / name])))
    env = os.environ.get(ENV_VAR, "")
    env_dirs = [Path(os.path.expanduser(p)) / name for p in env.split(os.pathsep) if p.strip()]
    groups.append((f"${ENV_VAR}", expand(env_dirs)))
    groups.append(("system", expand([Path(SYSTEM_DATA_DIR) / name])))
    return groups


def _find_file(directory: Path, base: str, allow_gz: bool) -> Optional[Path]:
    """``directory/base``, or ``directory/base.gz`` when ``allow_gz`` (raw preferred)."""
    cands = (directory / base, directory / (base + ".gz")) if allow_gz else (directory / base,)
    for cand in cands:
        if cand.is_file():
            return cand
    return None


def _describe_search(name: str, groups, note: Optional[str] = None) -> str:
    lines = ["Looked in:"]
    seen = set()
    for label, dirs in groups:
        if not dirs:
            lines.append(f"  - (${ENV_VAR} is not set)" if label == f"${ENV_VAR}" else f"  - ({label}: none)")
            continue
        for d in dirs:
            if d in seen:
                continue
            seen.add(d)
            state = "missing" if not d.exists() else ("not a directory" if not d.is_dir() else "no data files")
            if note is not None and str(d) == note:
                state = "incomplete"
            lines.append(f"  - {d}  [{label}: {state}]")
    files = _required_files(name)
    shown = ", ".join(files if not name.endswith("mnist") else (f + "[.gz]" for f in files))
    howto = _HOWTO[name].format(files=shown, system=Path(SYSTEM_DATA_DIR) / name)
    lines.append(f"To get the data: {howto}; DIR can be any directory you then pass as data_dir= "
                 f"(CLI: --data-dir), or ${ENV_VAR}/{name}, or {Path(SYSTEM_DATA_DIR) / name}.")
    return "\n".join(lines)


def _locate(name: str, data_dir) -> tuple[Path, dict[str, Path], list]:
    """Return (directory, {base name: file}, searched groups) or raise DatasetError."""
    groups = _candidate_groups(name, data_dir)
    for _label, dirs in groups:
        partial: Optional[tuple[Path, list[str]]] = None
        for d in dirs:
            if not d.is_dir():
                continue
            found = {b: _find_file(d, b, name.endswith("mnist")) for b in _required_files(name)}
            present = {b: p for b, p in found.items() if p is not None}
            if len(present) == len(found):
                return d, present, groups
            if present and partial is None:
                partial = (d, [b for b, p in found.items() if p is None])
        if partial is not None:
            d, missing = partial
            raise DatasetError(
                f"Data set {name!r}: incomplete copy in {d}; missing {', '.join(missing)}.\n"
                + _describe_search(name, groups, note=str(d)))
    raise DatasetError(f"Data set {name!r} not found.\n" + _describe_search(name, groups))


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def read_idx(path) -> np.ndarray:
    """Parse one IDX file (``.gz`` or raw) into a numpy array in native byte order.

    Checks the magic number (two zero bytes, a known dtype code, a dimension
    count of at least 1) and that the payload length is exactly the product of
    the dimensions times the item size.  Raises :class:`DatasetError` otherwise.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX dtype code 0x{code:02x} (magic 0x{raw[:4].hex()})")
    if ndim == 0:
        raise DatasetError(f"{path}: IDX file declares zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        raise DatasetError(
            f"{path}: IDX payload has {got} bytes but dimensions {dims} of {dtype} need {expected}"
            + (" (file truncated?)" if got < expected else " (trailing data)"))
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _check_labels(path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DatasetError(f"{path}: labels must be one-dimensional, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels outside [0, {num_classes}): "
                           f"min {labels.min()}, max {labels.max()}")
    return labels


def _load_idx_pair(img_path: Path, lbl_path: Path, info: DatasetInfo):
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    h, w = info.image_size
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (h, w):
        raise DatasetError(f"{img_path}: expected uint8 images of shape (N, {h}, {w}), "
                           f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{lbl_path}: expected a one-dimensional uint8 label file, "
                           f"got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"label count {labels.shape[0]} in {lbl_path} does not match "
                           f"image count {images.shape[0]} in {img_path}")
    labels = _check_labels(lbl_path, labels, info.num_classes)
    return images[:, None, :, :], labels


def _load_idx_dataset(name: str, files: dict[str, Path]):
    info = _INFO[name]
    train = _load_idx_pair(files[_IDX_FILES[0]], files[_IDX_FILES[1]], info)
    test = _load_idx_pair(files[_IDX_FILES[2]], files[_IDX_FILES[3]], info)
    return train, test, info


# --------------------------------------------------------------------------- CIFAR pickles

def _numpy_reconstruct():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray._reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core import numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import numeric
    return numeric._frombuffer


_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
    ("builtins", "bytearray"): lambda: bytearray,
    ("__builtin__", "bytearray"): lambda: bytearray,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays."""

    def find_class(self, module, name):
        factory = _SAFE_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return factory()


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # any failure inside the unpickler means a corrupt file
        raise DatasetError(f"{path}: not a valid CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # Official files were written by Python 2, so keys come back as bytes.
    out = {}
    for k, v in obj.items():
        out[k.decode("latin1") if isinstance(k, bytes) else k] = v
    return out


def _cifar_batch(path: Path, label_key: str, num_classes: int):
    d = _load_pickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise DatasetError(f"{path}: missing key {key!r} (found {sorted(map(str, d))})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(d[label_key])
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable {label_key!r}: {exc}") from exc
    labels = _check_labels(path, labels, num_classes)
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_names(path: Path, key: str, count: int) -> tuple[str, ...]:
    d = _load_pickle(path)
    names = d.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != count:
        raise DatasetError(f"{path}: {key!r} must be a list of {count} names")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def _load_cifar(name: str, directory: Path, files: dict[str, Path]):
    info = _INFO[name]
    if name == "cifar10":
        label_key, train_files, test_file, meta, names_key = (
            "labels", [files[f"data_batch_{i}"] for i in range(1, 6)], files["test_batch"],
            "batches.meta", "label_names")
    else:
        label_key, train_files, test_file, meta, names_key = (
            "fine_labels", [files["train"]], files["test"], "meta", "fine_label_names")
    parts = [_cifar_batch(p, label_key, info.num_classes) for p in train_files]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _cifar_batch(test_file, label_key, info.num_classes)
    meta_path = directory / meta
    if meta_path.is_file():  # optional; gives the class names
        info = dataclasses.replace(info, class_names=_cifar_names(meta_path, names_key, info.num_classes))
    return train, test, info


# --------------------------------------------------------------------------- digits

def _load_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    test_idx = stratified_split(torch.from_numpy(labels), 0.25, seed=0)[1].numpy()
    mask = np.zeros(len(labels), dtype=bool)
    mask[test_idx] = True
    x = images[:, None, :, :]
    return (x[~mask], labels[~mask]), (x[mask], labels[mask])


# --------------------------------------------------------------------------- splitting

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _derive_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integer parts (order matters)."""
    h = 0x6C69707465636821  # arbitrary non-zero start
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(_derive_seed(*parts))
    return g


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into ``(keep, held_out)``, stratified by label.

    ``held_out`` has ``round(fraction * N)`` elements (at least 1 and at most
    ``N - 1`` when ``0 < fraction < 1``); every class contributes the floor or
    ceiling of its proportional share (largest remainders get the extra
    elements).  Which members of a class are held out is a random choice that
    depends only on ``seed``.  Both index tensors are sorted (int64).
    """
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu()
    n = labels.numel()
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    if k == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    classes, counts = torch.unique(labels, return_counts=True)
    share = counts.double() * k / n
    take = share.floor().long()
    rest = k - int(take.sum())
    if rest > 0:
        order = sorted(range(len(classes)), key=lambda i: (-(share[i] - take[i]).item(), i))
        for i in order[:rest]:
            take[i] += 1
    g = _generator(seed, 0x5EED)
    held = []
    for c, t in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == c).reshape(-1)
        perm = torch.randperm(members.numel(), generator=g)
        held.append(members[perm[:t]])
    held_idx = torch.sort(torch.cat(held)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_idx] = False
    return torch.nonzero(mask).reshape(-1), held_idx


# --------------------------------------------------------------------------- public loader

def _to_tensors(images: np.ndarray, labels: np.ndarray):
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    else:
        x = x.to(torch.float32)
    y = torch.from_numpy(np.ascontiguousarray(labels)).to(torch.int64)
    return x, y


def _check_limit(value, what: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int or None, got {value!r}")
    return int(value)


def load_dataset(name: str, data_dir=None, val_fraction: float = 0.0, seed: int = 0,
                 limit_train: Optional[int] = None, limit_test: Optional[int] = None) -> Splits:
    """Load ``name`` as in-memory tensors.

    Images are float32 ``(N, C, H, W)`` in ``[0, 1]``; labels are int64.

    * ``data_dir``: where to look first (the directory itself or
      ``data_dir/<name>``), see the module docstring for the full search order.
    * ``limit_train`` / ``limit_test``: keep only the first that many training
      / test examples (quick runs).  ``limit_train`` is applied *before* the
      validation split, so train + val together come from those examples.
    * ``val_fraction``: hold out this fraction of the (limited) training set
      as a validation split, stratified by class and chosen by ``seed``
      (see :func:`stratified_split`).  ``0`` gives ``val=None``.

    Raises :class:`DatasetError` when the files are missing or corrupt.
    """
    key = _canonical(name)
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    limit_train = _check_limit(limit_train, "limit_train")
    limit_test = _check_limit(limit_test, "limit_test")

    source: Optional[str] = None
    if key == "digits":
        (xtr, ytr), (xte, yte) = _load_digits()
        info = _INFO[key]
    else:
        directory, files, groups = _locate(key, data_dir)
        source = str(directory)
        try:
            if key in ("mnist", "fashion-mnist"):
                (xtr, ytr), (xte, yte), info = _load_idx_dataset(key, files)
            else:
                (xtr, ytr), (xte, yte), info = _load_cifar(key, directory, files)
        except DatasetError as exc:
            raise DatasetError(f"Data set {key!r} in {directory} is corrupt: {exc}\n"
                               + _describe_search(key, groups)) from exc
        if len(ytr) == 0 or len(yte) == 0:
            raise DatasetError(f"Data set {key!r} in {directory} has an empty train or test split.\n"
                               + _describe_search(key, groups))

    if limit_train is not None:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if limit_test is not None:
        xte, yte = xte[:limit_test], yte[:limit_test]
    train = _to_tensors(xtr, ytr)
    test = _to_tensors(xte, yte)

    val = None
    if val_fraction > 0.0:
        keep, held = stratified_split(train[1], val_fraction, seed=seed)
        val = (train[0][held], train[1][held])
        train = (train[0][keep], train[1][keep])
    return Splits(train=train, val=val, test=test, info=info, source=source)


# --------------------------------------------------------------------------- batching

_AUGMENTS = (None, "flip", "crop-flip")


def _random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and take a random ``H x W`` window per sample (one gather)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def _random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class BatchIterator:
    """Deterministic mini-batches over in-memory tensors.

    ``batches(epoch)`` yields ``(xb, yb)``.  The order and the augmentation of
    epoch ``e`` depend only on ``(seed, e)`` (and the rank), through local
    ``torch.Generator`` objects; the global RNG is never touched.  So a run
    resumed at epoch ``e`` sees exactly the batches it would have seen.

    With ``world_size > 1`` all ranks share one permutation; rank ``r`` takes
    positions ``r, r + world_size, ...``.  If ``N`` is not a multiple of
    ``world_size`` the permutation is padded by wrapping around to its start
    (``drop_last=False``) or its tail is dropped (``drop_last=True``), so every
    rank has the same number of samples and batches.  ``drop_last`` also drops
    each rank's final partial batch.

    ``augment``: ``None``; ``"flip"`` (horizontal flip with probability 1/2);
    ``"crop-flip"`` (zero-pad 4 pixels, random crop back to ``H x W``, then
    the flip).  Augmentation is vectorised over the batch and expects 4-D
    ``x``.  See :attr:`DatasetInfo.augment` for per-data-set defaults.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                 augment: Optional[str] = None, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augment not in _AUGMENTS:
            raise ValueError(f"augment must be one of {_AUGMENTS}, got {augment!r}")
        if augment is not None and x.dim() != 4:
            raise ValueError(f"augment={augment!r} needs images of shape (N, C, H, W), got {tuple(x.shape)}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        n = x.shape[0]
        if self.drop_last:
            self.num_samples = n // self.world_size
        else:
            self.num_samples = -(-n // self.world_size)
        if self.drop_last:
            self._num_batches = self.num_samples // self.batch_size
        else:
            self._num_batches = -(-self.num_samples // self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        return self._num_batches

    def indices(self, epoch: int) -> torch.Tensor:
        """Sample indices this rank visits in ``epoch``, in order (before dropping a partial batch)."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, epoch, 1))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # wrap around
            order = order.repeat(-(-total // n))
        order = order[:total]
        return order[self.rank::self.world_size]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch``, beginning at batch number ``start`` (for mid-epoch resume)."""
        idx = self.indices(epoch)
        for b in range(int(start), self._num_batches):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size].to(self.x.device)
            xb = self.x.index_select(0, sel)
            yb = self.y.index_select(0, sel.to(self.y.device))
            if self.augment is not None:
                g = _generator(self.seed, epoch, 2, self.rank, b)
                if self.augment == "crop-flip":
                    xb = _random_crop(xb, 4, g)
                xb = _random_flip(xb, g)
            yield xb, yb

    def __repr__(self) -> str:
        return (f"BatchIterator(n={self.x.shape[0]}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"augment={self.augment!r}, seed={self.seed}, drop_last={self.drop_last}, "
                f"rank={self.rank}, world_size={self.world_size}, batches={len(self)})")
