"""Datasets for ``gradcomp train``, and the sharding that feeds data-parallel workers.

Every loader returns CPU tensors, is deterministic and never downloads.

Image datasets (``kind="image"``; ``x`` is float32 ``(N, 1, H, W)``, ``y`` int64):

``digits``
    scikit-learn's bundled ``load_digits`` (1797 8x8 images), pixels scaled to
    [0, 1] (no mean/std normalisation); a fixed 80/20 train/test split drawn
    with ``torch.randperm`` from a generator seeded with :data:`DIGITS_SPLIT_SEED`
    (0): 1437 train, 360 test, the same split as ``gradcomp demo``.
``mnist`` / ``fashion-mnist``
    the original IDX files (``train-images-idx3-ubyte.gz`` ...; uncompressed
    copies are accepted too), normalised as usual: ``(p/255 - mean) / std``
    with MNIST's 0.1307/0.3081 and Fashion-MNIST's 0.2860/0.3530.  A label
    outside 0-9 is refused (``ValueError`` naming the file and the first bad index).

Language-model datasets (``kind="lm"``; 1-D int64 token streams):

``ptb``
    Mikolov's Penn Treebank: per line the tokens of ``str.split()`` plus
    ``<eos>``; the vocabulary is built from the train file in order of first
    appearance, as PyTorch's ``word_language_model`` example does (10000 types).
``shakespeare``
    Tiny Shakespeare, characters: the vocabulary is the sorted set of
    characters of the whole text (65); split by position, the first 90% train,
    the next 5% valid, the last 5% test.

Where the files are looked for (first folder holding all files wins):

1. ``data_dir`` if given (``data_dir/<name>/``, then ``data_dir`` itself) and nowhere else;
2. otherwise ``$GRADCOMP_DATA/<name>/``, then ``<name>/`` in the ``shared/data``
   folder found walking up from this file (the one beside the repository
   checkout), then ``./data/<name>/``; for Fashion-MNIST also the location of
   the Debian package ``dataset-fashion-mnist`` (``dpkg -L``, falling back to
   ``/usr/share/datasets/fashion-mnist``).

A dataset found nowhere raises :class:`DatasetNotFoundError`, which lists
every folder searched and how to get the data.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypedDict, get_args

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "DataKind",
    "DatasetInfo",
    "DatasetName",
    "DIGITS_SPLIT_SEED",
    "ENV_VAR",
    "NORMALIZATION",
    "Dataset",
    "DatasetNotFoundError",
    "batchify",
    "data_roots",
    "dataset_info",
    "epoch_permutation",
    "image_batches",
    "lm_batches",
    "lm_steps",
    "load_dataset",
    "PARTITIONS",
    "Partition",
    "skewed_parts",
    "speaker_grouped",
    "read_idx",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)

#: The datasets :func:`load_dataset` reads.
DatasetName = Literal["digits", "mnist", "fashion-mnist", "ptb", "shakespeare"]
#: The values of :data:`DatasetName`, for the checks at run time.
DATASETS: tuple[DatasetName, ...] = get_args(DatasetName)
#: How training data is split among workers: ``iid`` (every worker draws from all of it) or ``skewed`` (each
#: worker from its own part: a few classes of an image dataset, a few speakers of Tiny Shakespeare).
Partition = Literal["iid", "skewed"]
#: The values of :data:`Partition`, for the checks at run time.
PARTITIONS: tuple[Partition, ...] = get_args(Partition)
#: What a dataset holds: images with labels, or a language model's token streams (see :class:`Dataset`).
DataKind = Literal["image", "lm"]
ENV_VAR = "GRADCOMP_DATA"
DIGITS_SPLIT_SEED = 0
#: (mean, std) of the pixels scaled to [0, 1], over the training set.
NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


class DatasetInfo(TypedDict):
    """What a dataset looks like, known without loading it (an entry of :data:`DATASET_INFO`)."""

    kind: DataKind
    input_shape: tuple[int, ...]
    num_classes: int


#: What each dataset looks like, known without loading it (``num_classes`` is the vocabulary for LMs).
DATASET_INFO: dict[str, DatasetInfo] = {
    "digits": {"kind": "image", "input_shape": (1, 8, 8), "num_classes": 10},
    "mnist": {"kind": "image", "input_shape": (1, 28, 28), "num_classes": 10},
    "fashion-mnist": {"kind": "image", "input_shape": (1, 28, 28), "num_classes": 10},
    "ptb": {"kind": "lm", "input_shape": (), "num_classes": 10000},
    "shakespeare": {"kind": "lm", "input_shape": (), "num_classes": 65},
}
_SUBDIR = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "ptb": "ptb", "shakespeare": "tinyshakespeare"}
_IDX_FILES = {  # role -> (base name, magic number)
    "train_images": ("train-images-idx3-ubyte", 2051),
    "train_labels": ("train-labels-idx1-ubyte", 2049),
    "test_images": ("t10k-images-idx3-ubyte", 2051),
    "test_labels": ("t10k-labels-idx1-ubyte", 2049),
}
_FILES = {
    "mnist": {role: base for role, (base, _) in _IDX_FILES.items()},
    "fashion-mnist": {role: base for role, (base, _) in _IDX_FILES.items()},
    "ptb": {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
    "shakespeare": {"text": "input.txt"},
}
_HOW_TO_GET = {
    "mnist": "set GRADCOMP_DATA or --data-dir to a folder containing mnist/ with train-images-idx3-ubyte.gz, "
             "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (the original "
             "MNIST release; .gz or uncompressed)",
    "fashion-mnist": "install the Debian package (apt-get install dataset-fashion-mnist), or set GRADCOMP_DATA or "
                     "--data-dir to a folder containing fashion-mnist/ with the four IDX files of the Zalando "
                     "release (train-images-idx3-ubyte.gz ...)",
    "ptb": "set GRADCOMP_DATA or --data-dir to a folder containing ptb/ with ptb.train.txt, ptb.valid.txt, "
           "ptb.test.txt (.txt or .txt.gz; Mikolov's simple-examples LM split)",
    "shakespeare": "set GRADCOMP_DATA or --data-dir to a folder containing tinyshakespeare/input.txt "
                   "(or input.txt.gz; Karpathy's char-rnn Tiny Shakespeare)",
}
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES: dict[int, np.dtype] = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
                                    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the folders searched.

    Args:
        message: what was looked for, where, and how to get it.
        searched: the folders searched, kept as ``searched``.
    """

    def __init__(self, message: str, searched: list[Path] | None = None) -> None:
        super().__init__(message)
        self.searched = list(searched or [])

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(kw_only=True)
class Dataset:
    """One loaded dataset.

    Image datasets fill ``x_train, y_train, x_test, y_test`` (float32
    ``(N, *input_shape)`` and int64 ``(N,)``); language-model datasets fill
    ``train, valid, test`` (1-D int64 token streams), ``vocab`` (token of each
    id) and ``vocab_size``.  ``num_classes`` is the number of labels, or the
    vocabulary size for an LM.  ``source`` says where it was read from.

    Args:
        name: the dataset's name.
        kind: ``"image"`` or ``"lm"``.
        num_classes: the number of labels, or the vocabulary size.
        input_shape: the shape of one image (``()`` for an LM).
        x_train: training images (image datasets).
        y_train: training labels (image datasets).
        x_test: test images (image datasets).
        y_test: test labels (image datasets).
        train: the training token stream (LMs).
        valid: the validation token stream (LMs).
        test: the test token stream (LMs).
        vocab: the token of each id (LMs).
        vocab_size: the vocabulary size (default: ``len(vocab)``).
        source: where it was read from.

    Raises:
        ValueError: ``kind`` is neither, a tensor its kind needs is missing, images and labels differ in
            number, a label is outside ``0 .. num_classes - 1``, or ``vocab_size`` differs from ``len(vocab)``.

    Example:
        >>> import torch
        >>> from gradcomp.train.data import Dataset
        >>> Dataset(name="tiny", kind="lm", num_classes=3, train=torch.tensor([0, 1, 2, 1]),
        ...         valid=torch.tensor([2, 0]), test=torch.tensor([1]), vocab=("a", "b", "c"))
        Dataset(name='tiny', kind='lm', train=4, valid=2, test=1 tokens, vocab_size=3, num_classes=3)
    """

    name: str
    kind: DataKind
    num_classes: int
    input_shape: tuple[int, ...] = ()
    x_train: Tensor | None = None
    y_train: Tensor | None = None
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    train: Tensor | None = None
    valid: Tensor | None = None
    test: Tensor | None = None
    vocab: tuple[str, ...] = ()
    vocab_size: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("image", "lm"):
            raise ValueError(f"kind must be 'image' or 'lm', got {self.kind!r}")
        if self.kind == "image":
            for field in ("x_train", "y_train", "x_test", "y_test"):
                if getattr(self, field) is None:
                    raise ValueError(f"{field} is required for an image dataset")
            assert (self.x_train is not None and self.y_train is not None and self.x_test is not None
                    and self.y_test is not None)  # checked just above
            if self.x_train.shape[0] != self.y_train.shape[0] or self.x_test.shape[0] != self.y_test.shape[0]:
                raise ValueError("x and y must hold the same number of samples")
            for field in ("y_train", "y_test"):
                _check_labels(getattr(self, field), self.num_classes, f"{self.name} {field}", self.name)
        else:
            for field in ("train", "valid", "test"):
                if getattr(self, field) is None:
                    raise ValueError(f"{field} is required for an lm dataset")
            if self.vocab_size is None:
                self.vocab_size = len(self.vocab)
            if self.vocab and len(self.vocab) != self.vocab_size:
                raise ValueError(f"vocab_size {self.vocab_size} differs from len(vocab) {len(self.vocab)}")

    def __repr__(self) -> str:
        if self.kind == "image":
            assert self.y_train is not None and self.y_test is not None  # an image dataset holds them
            sizes = f"train={len(self.y_train)}, test={len(self.y_test)}, input_shape={self.input_shape}"
        else:
            assert self.train is not None and self.valid is not None and self.test is not None  # an lm's
            sizes = (f"train={self.train.numel()}, valid={self.valid.numel()}, test={self.test.numel()} tokens, "
                     f"vocab_size={self.vocab_size}")
        return f"Dataset(name={self.name!r}, kind={self.kind!r}, {sizes}, num_classes={self.num_classes})"


def dataset_info(name: str) -> dict:
    """What a dataset looks like, without loading it.

    Args:
        name: one of :data:`DATASETS`.

    Returns:
        A copy of its :data:`DATASET_INFO` entry: ``kind``, ``input_shape`` and ``num_classes`` (the vocabulary
        for LMs).

    Raises:
        ValueError: an unknown name.

    Example:
        >>> from gradcomp.train.data import dataset_info
        >>> dataset_info("mnist")
        {'kind': 'image', 'input_shape': (1, 28, 28), 'num_classes': 10}
    """
    _check_name(name)
    return dict(DATASET_INFO[name])


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- finding files

@lru_cache(maxsize=1)
def _shared_data_dir() -> Path | None:
    """The ``shared/data`` folder beside the repository checkout, found walking up from this file."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The data roots searched, in order (see the module docstring).

    Args:
        data_dir: the one root given (``--data-dir``), or None for the default ones.

    Returns:
        ``[data_dir]``; else ``$GRADCOMP_DATA`` if set, the ``shared/data`` folder beside the checkout if there
        is one, and ``data``.
    """
    if data_dir is not None:
        return [Path(data_dir)]
    roots = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env))
    shared = _shared_data_dir()
    if shared is not None:
        roots.append(shared)
    roots.append(Path("data"))
    return roots


def _fashion_system_dirs() -> list[Path]:
    """Folders where the Debian package ``dataset-fashion-mnist`` put its IDX files."""
    dirs: list[Path] = []
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            path = Path(line.strip())
            if path.name.startswith("train-images-idx3-ubyte") and path.parent not in dirs:
                dirs.append(path.parent)
    if _FASHION_SYSTEM_DIR not in dirs:
        dirs.append(_FASHION_SYSTEM_DIR)
    return dirs


def _candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    sub = _SUBDIR[name]
    if data_dir is not None:
        root = Path(data_dir)
        return [root / sub, root]
    dirs = [root / sub for root in data_roots(None)]
    if name == "fashion-mnist":
        dirs += _fashion_system_dirs()
    return dirs


def _find_file(folder: Path, base: str) -> Path | None:
    names = [base + ".gz", base]
    if "-idx" in base:  # the original archives name their members e.g. train-images.idx3-ubyte
        dotted = base.replace("-idx", ".idx")
        names += [dotted + ".gz", dotted]
    for n in names:
        path = folder / n
        if path.is_file():
            return path
    return None


def _locate(name: str, data_dir: str | os.PathLike | None) -> dict[str, Path]:
    """The files of ``name`` from the first candidate folder holding them all."""
    wanted = _FILES[name]
    searched = _candidate_dirs(name, data_dir)
    notes = []
    for folder in searched:
        found = {role: _find_file(folder, base) for role, base in wanted.items()}
        present = {role: path for role, path in found.items() if path is not None}
        if len(present) == len(found):
            return present
        if folder.is_dir():
            missing = [wanted[r] for r, p in found.items() if p is None]
            notes.append(f"  {folder}  (exists; missing {', '.join(missing)})")
        else:
            notes.append(f"  {folder}  (no such folder)")
    if data_dir is None and _shared_data_dir() is None:
        notes.append("  (no shared/data folder found beside the repository)")
    raise DatasetNotFoundError(
        f"dataset {name!r} not found. Looked in:\n" + "\n".join(notes) + f"\nTo get it: {_HOW_TO_GET[name]}.",
        searched)


# ----------------------------------------------------------------------------- reading files

def _read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when it is gzip (by magic bytes, whatever its name).  Kept for the
    next call while the file is unchanged (a study loads its dataset once per run)."""
    st = path.stat()
    return _read_bytes_of(path.resolve(), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _read_bytes_of(path: Path, mtime_ns: int, size: int) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: cannot decompress ({exc}); the file is corrupt or truncated") from exc
    return raw


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip or plain) into a read-only numpy array of its header's shape.

    The header is checked: two zero bytes, a known type code, ``magic`` (2051
    for images, 2049 for labels) when given, and a payload of exactly
    ``prod(dims) * itemsize`` bytes.  Anything else raises ``ValueError``
    naming the file.

    Args:
        path: the file.
        magic: the magic number the header must hold (None: any known type).

    Returns:
        The array, read-only, of the header's shape and type.

    Raises:
        ValueError: the header or the length is wrong, or a gzip file does not decompress.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header (truncated?)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    found_magic = int.from_bytes(raw[:4], "big")
    if magic is not None and found_magic != magic:
        raise ValueError(f"{path}: IDX magic number {found_magic}, expected {magic}")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says {'x'.join(map(str, dims))} ({expected} bytes) but the file "
                         f"holds {len(raw)} bytes; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc


# ----------------------------------------------------------------------------- loaders

def _limit(tensors: tuple[Tensor, ...], limit: int | None) -> tuple[Tensor, ...]:
    return tensors if limit is None else tuple(t[:limit] for t in tensors)


def _load_digits(limit_train: int | None) -> Dataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    x_train, y_train = _limit((x[:split], y[:split]), limit_train)
    return Dataset(name="digits", kind="image", num_classes=10, input_shape=(1, 8, 8), x_train=x_train,
                   y_train=y_train, x_test=x[split:], y_test=y[split:], source="sklearn.datasets.load_digits")


def _load_idx_images(name: str, data_dir: str | os.PathLike | None, limit_train: int | None) -> Dataset:
    files = _locate(name, data_dir)
    mean, std = NORMALIZATION[name]
    classes = DATASET_INFO[name]["num_classes"]
    arrays = {role: read_idx(files[role], _IDX_FILES[role][1]) for role in _IDX_FILES}
    out = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        path = files[f"{split}_images"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(f"{files[f'{split}_labels']}: expected uint8 labels of shape (N,), got "
                             f"{labels.dtype} {labels.shape}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{path}: {images.shape[0]} images but {files[f'{split}_labels']} holds "
                             f"{labels.shape[0]} labels")
        _check_labels(labels, classes, str(files[f"{split}_labels"]), name)  # the whole file, before limit_train
        if split == "train" and limit_train is not None:
            images, labels = images[:limit_train], labels[:limit_train]
        x = images.astype(np.float32)
        x *= 1.0 / (255.0 * std)  # (p/255 - mean)/std, in place
        x -= mean / std
        out[split] = (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    (x_train, y_train), (x_test, y_test) = out["train"], out["test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{files['train_images']}: train images {tuple(x_train.shape[2:])} and test images "
                         f"{tuple(x_test.shape[2:])} differ in size")
    return Dataset(name=name, kind="image", num_classes=classes, input_shape=tuple(x_train.shape[1:]),
                   x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   source=str(files["train_images"].parent))


def _check_labels(labels: np.ndarray | Tensor, classes: int, where: str, name: str) -> None:
    """Refuse (``ValueError`` naming ``where`` and the first bad index) a label outside ``0 .. classes - 1``:
    a damaged file would otherwise train a model with as many outputs as its largest label."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{where}: label {labels[i]} at index {i} is not one of the {classes} classes "
                         f"of {name} (0-{classes - 1}); {bad.size} bad label(s) in all: the file is damaged")


def _ptb_words(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append("<eos>")
    return words


def _load_ptb(data_dir: str | os.PathLike | None, limit_train: int | None) -> Dataset:
    files = _locate("ptb", data_dir)
    words = {split: _ptb_words(_read_text(files[split])) for split in ("train", "valid", "test")}
    itos = tuple(dict.fromkeys(words["train"]))  # order of first appearance, as word_language_model
    stoi = {w: i for i, w in enumerate(itos)}
    unk = stoi.get("<unk>")
    streams = {}
    for split, toks in words.items():
        try:
            ids = [stoi[w] for w in toks]
        except KeyError:
            if unk is None:
                missing = next(w for w in toks if w not in stoi)
                raise ValueError(f"{files[split]}: word {missing!r} is not in the train vocabulary and there is "
                                 "no <unk>") from None
            ids = [stoi.get(w, unk) for w in toks]
        streams[split] = torch.tensor(ids, dtype=torch.int64)
    (train,) = _limit((streams["train"],), limit_train)
    return Dataset(name="ptb", kind="lm", num_classes=len(itos), train=train, valid=streams["valid"],
                   test=streams["test"], vocab=itos, vocab_size=len(itos), source=str(files["train"].parent))


def _load_shakespeare(data_dir: str | os.PathLike | None, limit_train: int | None) -> Dataset:
    files = _locate("shakespeare", data_dir)
    text = _read_text(files["text"])
    if len(text) < 20:
        raise ValueError(f"{files['text']}: only {len(text)} characters")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    chars, ids = np.unique(codes, return_inverse=True)
    vocab = tuple(chr(int(c)) for c in chars)
    stream = torch.from_numpy(ids.astype(np.int64).reshape(-1))
    n = stream.numel()
    a, b = int(0.9 * n), int(0.95 * n)
    (train,) = _limit((stream[:a],), limit_train)
    return Dataset(name="shakespeare", kind="lm", num_classes=len(vocab), train=train, valid=stream[a:b],
                   test=stream[b:], vocab=vocab, vocab_size=len(vocab), source=str(files["text"].parent))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, limit_train: int | None = None) -> Dataset:
    """Load one of :data:`DATASETS` as CPU tensors.

    ``data_dir`` is a data root (holding e.g. ``mnist/``) or the dataset's own
    folder; when it is None the default locations are searched (module
    docstring).  ``limit_train`` keeps only the first that many training
    samples (images) or tokens (LMs), for quick runs; test data is never cut.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: a data root or the dataset's folder (None: the default locations).
        limit_train: keep the first that many training samples or tokens (None: all).

    Returns:
        The :class:`Dataset`.

    Raises:
        DatasetNotFoundError: its files are in none of the folders searched (the message lists them).
        ValueError: an unknown name, a bad ``limit_train``, or a damaged file (named in the message).
    """
    _check_name(name)
    if limit_train is not None and (not isinstance(limit_train, int) or limit_train < 1):
        raise ValueError(f"limit_train must be an integer >= 1 or None, got {limit_train!r}")
    start = time.perf_counter()
    if name == "digits":
        ds = _load_digits(limit_train)
    elif name in ("mnist", "fashion-mnist"):
        ds = _load_idx_images(name, data_dir, limit_train)
    elif name == "ptb":
        ds = _load_ptb(data_dir, limit_train)
    else:
        ds = _load_shakespeare(data_dir, limit_train)
    log.info("loaded %r from %s in %.2f s", ds, ds.source, time.perf_counter() - start)
    return ds


# ----------------------------------------------------------------------------- sharding

def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def steps_per_epoch(n: int, global_batch: int, drop_last: bool = True) -> int:
    """Global steps in one epoch of ``n`` samples.

    Args:
        n: the number of samples.
        global_batch: the samples of one step, over all workers.
        drop_last: drop the last, smaller batch.

    Returns:
        ``n // global_batch``, or rounded up without ``drop_last``.

    Raises:
        ValueError: ``n`` < 0 or ``global_batch`` < 1.

    Example:
        >>> from gradcomp.train.data import steps_per_epoch
        >>> steps_per_epoch(1437, 128), steps_per_epoch(1437, 128, drop_last=False)
        (11, 12)
    """
    _check_positive("global_batch", global_batch)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    return n // global_batch if drop_last else -(-n // global_batch)


def epoch_permutation(n: int, epoch: int, seed: int, worker: int | None = None) -> Tensor:
    """The sample order of one epoch: ``numpy.random.default_rng([seed, epoch]).permutation(n)``, as int64.

    Args:
        n: the number of samples.
        epoch: the epoch (>= 0).
        seed: the run's seed (>= 0).
        worker: a worker whose own part is ordered (the key becomes ``[seed, epoch, worker]``); None: the
            whole set, the same on every rank.

    Returns:
        A permutation of ``range(n)``, int64.

    Raises:
        ValueError: ``seed`` or ``epoch`` is not an integer >= 0.

    Example:
        >>> import torch
        >>> from gradcomp.train.data import epoch_permutation
        >>> order = epoch_permutation(6, epoch=0, seed=1)
        >>> sorted(order.tolist()), torch.equal(order, epoch_permutation(6, epoch=0, seed=1))
        ([0, 1, 2, 3, 4, 5], True)
    """
    if not (isinstance(seed, int) and seed >= 0 and isinstance(epoch, int) and epoch >= 0):
        raise ValueError(f"seed and epoch must be integers >= 0, got seed={seed!r}, epoch={epoch!r}")
    key = [seed, epoch] if worker is None else [seed, epoch, worker]
    return torch.from_numpy(np.random.default_rng(key).permutation(n).astype(np.int64))


def skewed_parts(y: Tensor, num_workers: int, seed: int) -> list[Tensor]:
    """A non-i.i.d. split of a labelled training set: the sample indices sorted by label (ties in a seeded
    random order), cut into ``num_workers`` equal contiguous parts (the remainder dropped).  With 10
    classes and 4 workers each worker holds 2 or 3 classes and no other.

    Args:
        y: the labels.
        num_workers: the number of parts (>= 1).
        seed: the seed of the order of ties.

    Returns:
        One index tensor per worker, ``len(y) // num_workers`` indices each.

    Raises:
        ValueError: ``num_workers`` < 1, or more workers than samples.

    Example:
        >>> import torch
        >>> from gradcomp.train.data import skewed_parts
        >>> y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        >>> [y[part].tolist() for part in skewed_parts(y, num_workers=2, seed=0)]
        [[0, 0, 0, 1], [1, 1, 2, 2]]
    """
    _check_positive("num_workers", num_workers)
    per = len(y) // num_workers
    if per == 0:
        raise ValueError(f"{len(y)} samples cannot be split among {num_workers} workers")
    order = epoch_permutation(len(y), 0, seed)
    order = order[torch.argsort(y[order], stable=True)]
    return list(order[:per * num_workers].split(per))


def speaker_grouped(stream: Tensor, vocab: tuple[str, ...], num_workers: int) -> Tensor:
    """Tiny Shakespeare's characters reordered for a non-i.i.d. split: its speeches (blocks separated by a
    blank line, whose first line names the speaker) grouped by speaker, the speakers dealt to
    ``num_workers`` groups of nearly equal length (largest first, each to the shortest group), the groups
    in worker order.  :func:`batchify` then gives worker ``w`` (rows block ``w``) about group ``w``'s text.

    Args:
        stream: the character ids of the text.
        vocab: the sorted characters of the text (the dataset's ``vocab``).
        num_workers: the number of groups (>= 1).

    Returns:
        The reordered ids, as long as ``stream``.

    Raises:
        ValueError: ``num_workers`` < 1, or ``vocab`` is not sorted.
    """
    _check_positive("num_workers", num_workers)
    codes = np.array([ord(c) for c in vocab])
    if np.any(np.diff(codes) <= 0):
        raise ValueError("vocab must be the sorted characters of the text (Tiny Shakespeare's)")
    text = "".join(vocab[i] for i in stream.tolist())
    by_speaker: dict[str, list[str]] = {}
    for speech in text.split("\n\n"):
        by_speaker.setdefault(speech.split("\n", 1)[0], []).append(speech + "\n\n")
    size = {speaker: sum(map(len, speeches)) for speaker, speeches in by_speaker.items()}
    groups: list[list[str]] = [[] for _ in range(num_workers)]
    lengths = [0] * num_workers
    for speaker in sorted(by_speaker, key=lambda k: -size[k]):
        w = lengths.index(min(lengths))
        groups[w] += by_speaker[speaker]
        lengths[w] += size[speaker]
    out = "".join("".join(g) for g in groups)[:len(text)]  # the last speech had no blank line after it
    ids = np.searchsorted(codes, np.frombuffer(out.encode("utf-32-le"), dtype="<u4"))
    return torch.from_numpy(ids.astype(np.int64))


def image_batches(x: Tensor, y: Tensor, global_batch: int, num_workers: int, epoch: int, seed: int,
                  drop_last: bool = True, parts: list[Tensor] | None = None) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """One epoch of data-parallel batches: per step, a list of ``num_workers`` ``(x, y)`` shards.

    The epoch's order is :func:`epoch_permutation` ``(len(x), epoch, seed)``,
    the same on every rank; step ``s`` takes global batch
    ``order[s*global_batch:(s+1)*global_batch]`` and worker ``w`` gets its
    ``w``-th contiguous block of ``global_batch // num_workers`` samples.  So
    the shards are disjoint, their concatenation in rank order is the
    single-process batch, and a real rank keeps ``shards[rank]``.
    ``global_batch`` must be divisible by ``num_workers`` (``ValueError``).
    With ``drop_last=False`` the last, smaller batch is yielded too, split as
    evenly as possible (shard sizes then differ by at most one; a worker gets
    an empty shard if fewer samples than workers remain).

    ``parts`` (one index tensor per worker, e.g. :func:`skewed_parts`): each
    worker draws only from its own part, in the order
    ``epoch_permutation(len(part), epoch, seed, worker)``, for as many full
    steps as the shortest part allows.

    Args:
        x: the samples.
        y: their labels.
        global_batch: the samples of one step, over all workers.
        num_workers: the number of workers.
        epoch: the epoch (its order).
        seed: the run's seed.
        drop_last: drop the last, smaller batch.
        parts: one index tensor per worker, or None (i.i.d.).

    Returns:
        An iterator over the epoch's steps.

    Raises:
        ValueError: a bad setting, ``x`` and ``y`` of different lengths, fewer samples than a global batch, or
            a part smaller than a worker's batch.

    Example:
        >>> import torch
        >>> from gradcomp.train.data import image_batches
        >>> x, y = torch.randn(10, 1, 8, 8), torch.arange(10)
        >>> steps = list(image_batches(x, y, global_batch=4, num_workers=2, epoch=0, seed=0))
        >>> len(steps), [tuple(xs.shape) for xs, _ in steps[0]]  # 2 steps, 2 shards of 2 samples each
        (2, [(2, 1, 8, 8), (2, 1, 8, 8)])
        >>> labels = [int(label) for step in steps for _, ys in step for label in ys]
        >>> len(set(labels))  # every sample at most once
        8
    """
    _check_positive("global_batch", global_batch)
    _check_positive("num_workers", num_workers)
    if global_batch % num_workers:
        raise ValueError(f"global_batch {global_batch} is not divisible by num_workers {num_workers}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} samples but y {y.shape[0]}")
    n = x.shape[0]
    steps = steps_per_epoch(n, global_batch, drop_last)
    if steps == 0:
        raise ValueError(f"global_batch {global_batch} is larger than the {n} samples (drop_last={drop_last})")
    per_worker = global_batch // num_workers
    if parts is not None:
        if len(parts) != num_workers:
            raise ValueError(f"{len(parts)} parts for {num_workers} workers")
        orders = [part[epoch_permutation(len(part), epoch, seed, w)] for w, part in enumerate(parts)]
        steps = min(len(o) for o in orders) // per_worker
        if steps == 0:
            raise ValueError(f"a part of {min(len(o) for o in orders)} samples is smaller than the per-worker batch "
                             f"{per_worker}")
        return ([(x[i], y[i]) for i in (o[s * per_worker:(s + 1) * per_worker] for o in orders)]
                for s in range(steps))
    order = epoch_permutation(n, epoch, seed)

    def generate() -> Iterator[list[tuple[Tensor, Tensor]]]:
        for step in range(steps):
            idx = order[step * global_batch:(step + 1) * global_batch]
            parts = idx.split(per_worker) if len(idx) == global_batch else idx.tensor_split(num_workers)
            yield [(x[p], y[p]) for p in parts]

    return generate()


def batchify(stream: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D token stream into ``batch_size`` rows: a ``(batch_size, T)`` tensor, ``T = len // batch_size``.

    Row ``b`` is the contiguous stretch ``stream[b*T:(b+1)*T]`` (the tail that
    does not fill a row is dropped).  This is PyTorch's ``word_language_model``
    ``batchify`` transposed to batch-first, the layout :class:`~gradcomp.train.models.LSTMLM` uses.

    Args:
        stream: a 1-D token stream.
        batch_size: the number of rows (>= 1).

    Returns:
        The ``(batch_size, T)`` tensor, contiguous.

    Raises:
        ValueError: ``stream`` is not 1-D, or gives rows of fewer than 2 tokens.

    Example:
        >>> import torch
        >>> from gradcomp.train.data import batchify
        >>> batchify(torch.arange(11), 2)
        tensor([[0, 1, 2, 3, 4],
                [5, 6, 7, 8, 9]])
    """
    _check_positive("batch_size", batch_size)
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    t = stream.numel() // batch_size
    if t < 2:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for batch_size {batch_size}")
    return stream[:t * batch_size].reshape(batch_size, t).contiguous()


def lm_steps(data: Tensor, bptt: int) -> int:
    """Steps :func:`lm_batches` yields for a batchified ``(B, T)`` tensor.

    Args:
        data: the batchified tensor.
        bptt: the window length (>= 1).

    Returns:
        ``ceil((T - 1) / bptt)``.

    Raises:
        ValueError: ``bptt`` < 1.
    """
    _check_positive("bptt", bptt)
    return -(-(data.shape[1] - 1) // bptt)


def lm_batches(data: Tensor, bptt: int, num_workers: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Truncated-BPTT windows over a batchified ``(B, T)`` tensor, sharded among workers.

    Step ``i`` covers columns ``[i*bptt, i*bptt + L)`` with ``L = min(bptt,
    T - 1 - i*bptt)``; the target is the input shifted by one token.  The
    ``B`` rows are split into ``num_workers`` contiguous blocks of
    ``B // num_workers`` rows (``B`` must be divisible: ``ValueError``);
    worker ``w`` gets ``(input[w-th block], target[w-th block])``, each
    ``(B // num_workers, L)``.  Concatenating the workers' blocks gives the
    single-process batch, and each worker's LSTM state is its block of rows
    of the single-process state, carried across steps.

    Args:
        data: the batchified ``(B, T)`` tensor (:func:`batchify`).
        bptt: the window length (>= 1).
        num_workers: the number of workers; ``B`` must be divisible by it.

    Returns:
        An iterator over the steps (:func:`lm_steps` of them): per step, one ``(input, target)`` per worker.

    Raises:
        ValueError: a bad setting, ``data`` not 2-D or of fewer than 2 columns, or ``B`` not divisible.

    Example:
        >>> import torch
        >>> from gradcomp.train.data import batchify, lm_batches, lm_steps
        >>> data = batchify(torch.arange(10), 2)  # rows 0-4 and 5-9
        >>> lm_steps(data, bptt=3)
        2
        >>> first = next(lm_batches(data, bptt=3, num_workers=2))
        >>> [(inputs.tolist(), targets.tolist()) for inputs, targets in first]  # one row per worker
        [([[0, 1, 2]], [[1, 2, 3]]), ([[5, 6, 7]], [[6, 7, 8]])]
    """
    _check_positive("bptt", bptt)
    _check_positive("num_workers", num_workers)
    if data.dim() != 2:
        raise ValueError(f"data must be a batchified (B, T) tensor, got shape {tuple(data.shape)}")
    rows, t = data.shape
    if rows % num_workers:
        raise ValueError(f"the batch's {rows} rows are not divisible by num_workers {num_workers}")
    if t < 2:
        raise ValueError(f"data holds {t} columns; need at least 2 (input and target)")
    per_worker = rows // num_workers

    def generate() -> Iterator[list[tuple[Tensor, Tensor]]]:
        for start in range(0, t - 1, bptt):
            length = min(bptt, t - 1 - start)
            inp = data[:, start:start + length]
            tgt = data[:, start + 1:start + 1 + length]
            yield [(i, o) for i, o in zip(inp.split(per_worker), tgt.split(per_worker))]

    return generate()
