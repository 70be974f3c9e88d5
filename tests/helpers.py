"""Drive methods outside the simulator's training loop: one call = one step of N workers; wire-size formulas."""

import json
import math

import pytest
import torch

from gradcomp.cli import main
from gradcomp.simulator import run_exchanges
from gradcomp.train.data import DatasetNotFoundError, load_dataset


def exchange_step(methods, grads_per_worker):
    """One step: ``grads_per_worker[w]`` is worker w's {name: grad}; returns (averages of worker 0, bytes sent)."""
    n = len(methods)
    prepared = [m.prepare(g, n) for m, g in zip(methods, grads_per_worker)]
    gens = [{name: m.exchange(name, g[name], n) for name in g} for m, g in zip(methods, prepared)]
    results, sent = run_exchanges(gens)
    for m in methods:
        m.end_step()
    for other in results[1:]:
        for name in results[0]:
            assert torch.equal(other[name], results[0][name]), "workers disagree on the average"
    return results[0], sent


def compact_nbytes(n, k):
    """The compact sparse wire, written out from its definition: k float16 values, one float32 scale, and the
    Elias-Fano code of k indices below n (l = floor(log2(n / k)) low bits each, then k + ((n - 1) >> l) + 1
    unary bits), each part rounded up to whole bytes."""
    low = math.floor(math.log2(n / k))
    return 2 * k + 4 + math.ceil(k * low / 8) + math.ceil((k + ((n - 1) >> low) + 1) / 8)


def assert_same(a, b, where="checkpoint"):
    """Nested dicts / lists of tensors and plain values: equal, tensors bit for bit."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))} differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def need_datasets(*names):
    """Skip the calling test (or fixture) unless every dataset in ``names`` can be loaded."""
    for name in names:
        try:
            load_dataset(name, limit_train=1)
        except DatasetNotFoundError as error:
            pytest.skip(f"{name} not available: {error}")


def quick_study(table, tmp_path_factory, jobs=2):
    """``gradcomp reproduce TABLE`` (quick variant) into a fresh folder: (exit code, folder, report, JSON)."""
    out = tmp_path_factory.mktemp(table)
    rc = main(["reproduce", table, "--out", str(out), "--no-progress", "--jobs", str(jobs)])
    data = json.loads((out / f"{table}-quick.json").read_text())
    return rc, out, (out / f"{table}-quick.md").read_text(), data
