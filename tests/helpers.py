"""Drive methods outside the simulator's training loop: one call = one step of N workers; wire-size formulas;
the Python examples of the README and the manual."""

import json
import math
import os
import re
import subprocess
from pathlib import Path

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


# ------------------------------------------------------------------ the examples of README.md and docs/

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = "# run with: torchrun"  # the first line of an example that runs under torchrun
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)


def markdown_pages():
    """README.md and every page of the manual (docs/**/*.md; a build under docs/_build left out)."""
    docs = REPO / "docs"
    pages = sorted(p for p in docs.rglob("*.md") if "_build" not in p.relative_to(docs).parts)
    return [REPO / "README.md", *pages]


def python_examples(pages):
    """The ```python blocks of ``pages`` as two lists of ``pytest.param(block, id=...)``: plain ones, run
    in-process, and those starting with ``# run with: torchrun ...``.  The id names the page and the block's
    place on it (``docs/ddp-hook.md[0]``); a block found on several pages, word for word, is one example,
    its id naming every place."""
    places = {}
    for page in pages:
        for index, block in enumerate(PYTHON_BLOCK.findall(page.read_text())):
            places.setdefault(block, []).append(f"{page.relative_to(REPO)}[{index}]")
    plain, torchrun = [], []
    for block, where in places.items():
        (torchrun if block.startswith(TORCHRUN) else plain).append(pytest.param(block, id="=".join(where)))
    return plain, torchrun


def run_torchrun_example(block, folder, timeout=180):
    """Write ``block`` to ``folder`` under the script name of its first line (``# run with: torchrun ...
    NAME.py``) and run that command there, one thread per process; the finished process."""
    command = block.splitlines()[0].removeprefix("# run with: ").split()
    script = Path(folder) / command[-1]
    script.write_text(block)
    return subprocess.run(command[:-1] + [str(script)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=folder)
