"""Datasets and data-parallel sharding (gradcomp.train.data).

Real-data tests read the offline copies in shared/data (found as
``load_dataset`` finds them: $GRADCOMP_DATA, then shared/data beside the
checkout) and skip, saying why, when they are absent.  Expected values come
from shared/data/README.md and from the README's own numpy snippets.
"""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from gradcomp.train import data as D
from gradcomp.train.data import (
    DATASETS,
    DatasetNotFoundError,
    batchify,
    image_batches,
    lm_batches,
    lm_steps,
    load_dataset,
    read_idx,
    skewed_parts,
    speaker_grouped,
    steps_per_epoch,
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _load_or_skip(name):
    try:
        return load_dataset(name)
    except DatasetNotFoundError as exc:
        pytest.skip(f"{name} data not available offline here: {exc}")


@pytest.fixture(scope="module")
def mnist():
    return _load_or_skip("mnist")


@pytest.fixture(scope="module")
def ptb():
    return _load_or_skip("ptb")


@pytest.fixture(scope="module")
def shakespeare():
    return _load_or_skip("shakespeare")


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_fake_mnist(folder, n_train=12, n_test=5, gz=True):
    """A small, valid MNIST-format folder; returns the raw uint8 arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (n_train, 28, 28)), 2051),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, n_train), 2049),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (n_test, 28, 28)), 2051),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, n_test), 2049),
    }
    for base, (array, magic) in arrays.items():
        raw = _idx_bytes(array, magic)
        if gz:
            (folder / f"{base}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / base).write_bytes(raw)
    return {base: array for base, (array, _) in arrays.items()}


# ----------------------------------------------------------------------------- loading

def test_digits_shapes_range_and_fixed_split():
    ds = load_dataset("digits")
    assert ds.kind == "image" and ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    # reference: sklearn's arrays, permuted by the documented split (torch.randperm, seed 0)
    from sklearn.datasets import load_digits

    ref = load_digits()
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), ref.images[order[1437:]] / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train.numpy(), ref.target[order[:1437]])
    again = load_dataset("digits", limit_train=100)
    assert torch.equal(again.x_train, ds.x_train[:100]) and torch.equal(again.x_test, ds.x_test)


def test_mnist_real_files_counts_labels_and_pixels(mnist):
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert torch.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.y_test).tolist() == MNIST_TEST_COUNTS
    # pixels: README's own reading of the gz file, normalised with MNIST's mean/std
    path = f"{mnist.source}/t10k-images-idx3-ubyte.gz"
    ref = np.frombuffer(gzip.open(path).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    expected = (ref[:50].astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(mnist.x_test[:50, 0].numpy(), expected, atol=1e-5)
    # the usual constants really standardise the train set
    assert abs(mnist.x_train.mean().item()) < 1e-3 and abs(mnist.x_train.std().item() - 1) < 1e-3


def test_idx_folder_gz_or_plain_and_limit(tmp_path):
    arrays = _write_fake_mnist(tmp_path / "gz" / "mnist", gz=True)
    _write_fake_mnist(tmp_path / "plain", gz=False)  # data_dir may also be the dataset's own folder
    a = load_dataset("mnist", tmp_path / "gz")
    b = load_dataset("mnist", tmp_path / "plain", limit_train=7)
    expected = (arrays["train-images-idx3-ubyte"] / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(a.x_train[:, 0].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(a.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert torch.equal(b.x_train, a.x_train[:7]) and torch.equal(b.x_test, a.x_test)


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_a_label_outside_the_classes_is_refused_naming_the_file_and_index(tmp_path, split):
    """A damaged label byte (200) would train a 201-class model; the first bad index is named, even past
    limit_train (the whole file is checked)."""
    arrays = _write_fake_mnist(tmp_path / "mnist", gz=False)
    labels = arrays[f"{split}-labels-idx1-ubyte"].copy()
    labels[[3, 4]] = [200, 10]
    (tmp_path / "mnist" / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 2049))
    with pytest.raises(ValueError, match=rf"{split}-labels-idx1-ubyte: label 200 at index 3 is not one of the 10 "
                                         r"classes of mnist \(0-9\); 2 bad label"):
        load_dataset("mnist", tmp_path, limit_train=2)
    with pytest.raises(ValueError, match=r"digits y_test: label 10 at index 1 is not one of the 10 classes of digits"):
        D.Dataset(name="digits", kind="image", num_classes=10, x_train=torch.zeros(2, 1), y_train=torch.tensor([0, 9]),
                  x_test=torch.zeros(2, 1), y_test=torch.tensor([0, 10]))


def test_idx_parser_rejects_corrupt_files_naming_them(tmp_path):
    good = _idx_bytes(np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256, 2051)
    ok = tmp_path / "ok-idx3-ubyte"
    ok.write_bytes(good)
    assert read_idx(ok, 2051).shape == (2, 28, 28)
    cases = {
        "short-idx3-ubyte": good[:-100],  # payload truncated
        "header-idx3-ubyte": good[:10],  # header truncated
        "cut-idx3-ubyte.gz": gzip.compress(good)[:200],  # gzip stream truncated
        "junk-idx3-ubyte": b"PK\x03\x04" + good[4:],  # not IDX at all
    }
    for name, raw in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=name):
            read_idx(path, 2051)
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        read_idx(ok, 2049)


def test_a_file_read_again_is_reread_when_it_changed(tmp_path):
    """Files are kept after the first read (studies load their dataset once per run), but never stale."""
    path = tmp_path / "x-idx3-ubyte.gz"
    first = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    path.write_bytes(gzip.compress(_idx_bytes(first, 2051)))
    np.testing.assert_array_equal(read_idx(path, 2051), first)
    np.testing.assert_array_equal(read_idx(path, 2051), first)
    second = (first[:1] + 7) % 256  # another size
    path.write_bytes(gzip.compress(_idx_bytes(second, 2051)))
    np.testing.assert_array_equal(read_idx(path, 2051), second)
    path.write_bytes(gzip.compress(_idx_bytes((second + 1) % 256, 2051)))  # the same size, a later mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    np.testing.assert_array_equal(read_idx(path, 2051), (second + 1) % 256)


def test_truncated_real_mnist_copy_raises_naming_file(tmp_path):
    src = D._shared_data_dir()
    if src is None or not (src / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("shared/data/mnist not found beside the repository")
    folder = tmp_path / "mnist"
    folder.mkdir()
    for f in (src / "mnist").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    raw = (folder / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path)


def test_missing_dataset_lists_every_path_searched(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "mnist") in message and "GRADCOMP_DATA" in message

    # default search: $GRADCOMP_DATA, shared/data beside the repo, ./data, and Debian's folder for fashion-mnist
    monkeypatch.setenv("GRADCOMP_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(D, "_shared_data_dir", lambda: tmp_path / "shared")
    monkeypatch.setattr(D, "_fashion_system_dirs", lambda: [tmp_path / "debian"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "env" / "fashion-mnist").mkdir(parents=True)  # exists but empty
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    for folder in ("env", "shared", "data", "debian"):
        assert str(folder) in message, folder
    assert [p.name for p in info.value.searched] == ["fashion-mnist", "fashion-mnist", "fashion-mnist", "debian"]
    assert "missing train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(DatasetNotFoundError, match=r"ptb\.train\.txt"):
        load_dataset("ptb")


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="cifar10.*" + ", ".join(DATASETS)):
        load_dataset("cifar10")


def test_ptb_vocab_and_token_counts(ptb):
    assert ptb.kind == "lm" and ptb.vocab_size == ptb.num_classes == len(ptb.vocab) == 10000
    assert (ptb.train.numel(), ptb.valid.numel(), ptb.test.numel()) == (929589, 73760, 82430)
    assert ptb.train.dtype == torch.int64 and int(ptb.train.max()) < 10000
    # reference: the README's snippet
    lines = gzip.open(f"{ptb.source}/ptb.train.txt.gz", "rt").read().split("\n")[:-1]
    words = [w for line in lines[:200] for w in line.split() + ["<eos>"]]
    assert [ptb.vocab[i] for i in ptb.train[: len(words)].tolist()] == words


def test_shakespeare_chars_and_split(shakespeare):
    ds = shakespeare
    assert ds.kind == "lm" and ds.vocab_size == 65
    n = ds.train.numel() + ds.valid.numel() + ds.test.numel()
    assert n == 1115394
    assert ds.train.numel() == int(0.9 * n) and ds.valid.numel() == int(0.95 * n) - int(0.9 * n)
    text = gzip.open(f"{ds.source}/input.txt.gz", "rt").read()
    decode = lambda t: "".join(ds.vocab[i] for i in t.tolist())  # noqa: E731
    assert decode(ds.train[:300]) == text[:300] and decode(ds.test[-300:]) == text[-300:]
    assert list(ds.vocab) == sorted(set(text))


# ----------------------------------------------------------------------------- sharding

def test_image_shards_disjoint_and_union_is_the_global_batch():
    x = torch.arange(103, dtype=torch.float32).view(-1, 1) * 10
    y = torch.arange(103)
    single = list(image_batches(x, y, 12, 1, epoch=3, seed=7))
    four = list(image_batches(x, y, 12, 4, epoch=3, seed=7))
    assert len(single) == len(four) == steps_per_epoch(103, 12) == 8
    seen = []
    for (whole,), shards in zip(single, four):
        assert [s[1].numel() for s in shards] == [3, 3, 3, 3]
        ids = [s[1] for s in shards]
        assert len(set(torch.cat(ids).tolist())) == 12  # disjoint
        assert torch.equal(torch.cat(ids), whole[1])  # rank order = the single-process batch
        assert torch.equal(torch.cat([s[0] for s in shards]), whole[0]) and torch.equal(whole[0][:, 0], whole[1] * 10.)
        seen += whole[1].tolist()
    assert len(set(seen)) == 96  # no sample twice in an epoch
    # deterministic per (seed, epoch), and another epoch reshuffles
    again = list(image_batches(x, y, 12, 4, epoch=3, seed=7))
    assert all(torch.equal(a[0][1], b[0][1]) for a, b in zip(four, again))
    other = next(image_batches(x, y, 12, 4, epoch=4, seed=7))
    assert not torch.equal(other[0][1], four[0][0][1])
    # without drop_last every sample is seen once
    tail = list(image_batches(x, y, 12, 4, epoch=0, seed=0, drop_last=False))
    assert len(tail) == steps_per_epoch(103, 12, drop_last=False) == 9
    assert sorted(torch.cat([s[1] for b in tail for s in b]).tolist()) == list(range(103))


def test_skewed_parts_are_label_blocks_and_each_worker_draws_only_from_its_own():
    y = torch.arange(10).repeat_interleave(12)[torch.randperm(120, generator=torch.Generator().manual_seed(1))]
    x = torch.arange(120, dtype=torch.float32).view(-1, 1)
    parts = skewed_parts(y, 4, seed=3)
    assert [len(p) for p in parts] == [30] * 4 and len(set(torch.cat(parts).tolist())) == 120
    # the reference: the labels in sorted order, cut in four
    assert [sorted(y[p].tolist()) for p in parts] == [sorted(y.tolist())[w * 30:(w + 1) * 30] for w in range(4)]
    assert [len(set(y[p].tolist())) for p in parts] == [3, 3, 3, 3]  # 12 of each class: 2.5 classes a worker
    steps = list(image_batches(x, y, 8, 4, epoch=2, seed=3, parts=parts))
    assert len(steps) == 30 // 2
    for w in range(4):
        drawn = torch.cat([step[w][0].view(-1) for step in steps]).long()
        assert sorted(drawn.tolist()) == sorted(parts[w].tolist())  # its own part, each sample once
    again = list(image_batches(x, y, 8, 4, epoch=3, seed=3, parts=parts))
    assert not torch.equal(again[0][0][0], steps[0][0][0])  # reshuffled each epoch
    with pytest.raises(ValueError, match="3 parts for 4 workers"):
        next(image_batches(x, y, 8, 4, epoch=0, seed=0, parts=parts[:3]))
    with pytest.raises(ValueError, match="cannot be split"):
        skewed_parts(y[:3], 4, seed=0)


def test_speaker_grouped_keeps_every_character_and_gives_each_worker_its_own_speakers(shakespeare):
    stream = shakespeare.train
    grouped = speaker_grouped(stream, shakespeare.vocab, 4)
    assert torch.equal(grouped.sort().values, stream.sort().values)  # a permutation of the characters
    text = "".join(shakespeare.vocab[i] for i in grouped.tolist())
    quarter = len(text) // 4
    speakers = []
    for w in range(4):  # the speeches that start inside worker w's quarter of the stream
        block = text[w * quarter:(w + 1) * quarter]
        speakers.append({s.split("\n", 1)[0] for s in block.split("\n\n")[1:-1]})
    for a in range(4):
        for b in range(a + 1, 4):
            assert len(speakers[a] & speakers[b]) <= 2, (a, b)  # at most the speakers cut by a boundary
    # the original order is by play: the first quarter of the text already mixes many speakers of all
    original = "".join(shakespeare.vocab[i] for i in stream.tolist())
    first = {s.split("\n", 1)[0] for s in original[:quarter].split("\n\n")}
    assert len(first & set().union(*speakers[1:])) > 20


def test_non_divisible_or_too_large_batch_raises_at_call():
    x, y = torch.zeros(50, 1), torch.zeros(50, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible"):
        image_batches(x, y, 10, 3, epoch=0, seed=0)
    with pytest.raises(ValueError, match="larger"):
        image_batches(x, y, 64, 4, epoch=0, seed=0)
    with pytest.raises(ValueError, match="not divisible"):
        lm_batches(torch.zeros(6, 20, dtype=torch.long), 5, 4)


def test_batchify_matches_word_language_model_transposed():
    stream = torch.arange(103)
    ref = stream[: (103 // 4) * 4].view(4, -1).t().contiguous()  # the PyTorch example's (T, B)
    assert torch.equal(batchify(stream, 4), ref.t())


def test_lm_worker_blocks_concatenate_to_the_single_process_batch():
    data = batchify(torch.arange(8 * 23), 8)  # (8, 23)
    single = list(lm_batches(data, 5, 1))
    split = list(lm_batches(data, 5, 4))
    assert len(single) == len(split) == lm_steps(data, 5) == 5  # 22 predictable positions: 5+5+5+5+2
    for (whole,), blocks in zip(single, split):
        assert [b[0].shape[0] for b in blocks] == [2, 2, 2, 2]
        assert torch.equal(torch.cat([b[0] for b in blocks]), whole[0])
        assert torch.equal(torch.cat([b[1] for b in blocks]), whole[1])
        assert torch.equal(whole[1], whole[0] + 1)  # target = next token
    covered = torch.cat([s[0][0] for s in single], dim=1)
    assert torch.equal(covered, data[:, :-1])
