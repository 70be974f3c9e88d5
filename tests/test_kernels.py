"""DGC's compiled kernel against the torch ops it replaces, and against an independent top-k."""

import math
import re
import warnings

import pytest
import torch

from gradcomp import kernels
from gradcomp.compressors import bits, sparse
from gradcomp.compressors.base import num_selected
from gradcomp.compressors.sparse import FIELDS, WIDE_MIN
from gradcomp.method import DGC

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernel is not built")


def _gradients(label, shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    for _ in range(steps):
        if label == "normal":
            yield torch.randn(shape, generator=g)
        elif label == "ties":  # few distinct values: ties at the threshold
            yield torch.randint(-2, 3, shape, generator=g).float()
        elif label == "zeros":  # mostly zero: the sampled threshold is 0
            yield torch.where(torch.rand(n, generator=g) < 0.0002, 1.0, 0.0).view(shape)


def _run(shape, label, fused, monkeypatch, steps=3, seed=1, **options):
    """Payloads and the final memory of ``steps`` DGC steps through the kernel or the torch ops."""
    if not fused:
        monkeypatch.setattr(kernels, "library", lambda: None)
    method = DGC(warmup_epochs=0, sparsify_all=True, **options)
    payloads = [method.sparsify({"w": g})["w"] for g in _gradients(label, shape, steps, seed)]
    monkeypatch.undo()
    return payloads, method.memory


def _top_k_lowest_index_first(v, k):
    """The k largest |v|, the lower index first among equal magnitudes (a stable sort), ascending."""
    order = torch.sort(v.abs().view(-1).double(), descending=True, stable=True).indices
    return order[:k].sort().values


# sizes reaching every path: every entry sent (k = n), one part, and the blocks split over threads past
# 262,144 entries
SHAPES = [(1,), (7,), (300, 300), (2_000, 200), (600_000,)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", [dict(), dict(wire="plain"), dict(nesterov=True), dict(momentum_masking=False),
                                     dict(density=0.05), dict(min_entries=500)],
                         ids=["compact", "plain", "nesterov", "no-masking", "dense", "min-entries"])
def test_the_kernel_sends_and_keeps_exactly_what_the_torch_ops_do(shape, options, monkeypatch):
    fused, fused_memory = _run(shape, "normal", True, monkeypatch, **options)
    ref, ref_memory = _run(shape, "normal", False, monkeypatch, **options)
    for a, b in zip(fused, ref):
        for x, y in zip(a.tensors, b.tensors):
            assert x.dtype == y.dtype and torch.equal(x, y)
    for buffers in ("u", "v"):
        assert torch.equal(getattr(fused_memory, buffers)["w"], getattr(ref_memory, buffers)["w"])


@needs_kernel
@pytest.mark.parametrize("label", ["ties", "zeros"])
@pytest.mark.parametrize("shape", [(40_000,), (600_000,)])
def test_ties_go_to_the_lower_index(label, shape, monkeypatch):
    """Against a stable sort of the accumulated v (what the kernel selected from: v after the step plus
    what it sent), including a mostly-zero tensor where the sampled threshold is 0."""
    method = DGC(warmup_epochs=0, sparsify_all=True, wire="plain", density=0.001)
    for g in _gradients(label, shape, 3):
        values, indices = method.compressor.decode(method.sparsify({"w": g})["w"], g.numel())
        v = method.memory.v["w"].view(-1).clone()
        v[indices] += values
        assert torch.equal(indices, _top_k_lowest_index_first(v, num_selected(0.001, v.numel())))


@needs_kernel
def test_the_result_does_not_depend_on_the_number_of_threads(monkeypatch):
    runs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(kernels, "threads", lambda threads=threads: threads)
        payloads, memory = _run((700_000,), "normal", True, monkeypatch)
        runs.append((payloads, memory.v["w"]))
    for payloads, v in runs[1:]:
        assert torch.equal(v, runs[0][1])
        assert all(torch.equal(a.tensors[2], b.tensors[2]) for a, b in zip(payloads, runs[0][0]))


# One step's tensors: every path of the one call at once (with 2 and 3 threads the 600,000-entry tensor is
# wide, split over the threads; with 3 the 400,000-entry one too; the others are shared out whole), k = n
# included
MANY = {"a": (300, 300), "b": (7,), "c": (600_000,), "d": (1,), "e": (2_000, 200), "f": (40_000,)}


@needs_kernel
@pytest.mark.parametrize("wire", ["compact", "plain", "plain-int64"])
def test_one_call_for_many_tensors_gives_the_torch_ops_result_tensor_by_tensor(wire, monkeypatch):
    if wire == "plain-int64":  # as tensors of 2**31 entries or more have: int64 indices on the wire
        monkeypatch.setattr(sparse, "index_dtype", lambda numel: torch.int64)
        wire = "plain"
    steps = {name: list(_gradients("normal", shape, 3, seed=i)) for i, (name, shape) in enumerate(MANY.items())}
    ref_payloads = {}
    for name in MANY:
        with monkeypatch.context() as m:
            m.setattr(kernels, "library", lambda: None)
            method = DGC(warmup_epochs=0, sparsify_all=True, wire=wire)
            payloads = [method.sparsify({"w": g})["w"] for g in steps[name]]
        ref_payloads[name] = (payloads, method.memory.u["w"], method.memory.v["w"])
    for threads in (1, 2, 3):
        monkeypatch.setattr(kernels, "threads", lambda threads=threads: threads)
        method = DGC(warmup_epochs=0, sparsify_all=True, wire=wire)
        sent = [method.sparsify({name: steps[name][s] for name in MANY}) for s in range(3)]
        (plan,) = method.memory.workspace.plans.values()
        assert int(plan.rows[:, FIELDS.index("wide")].sum()) == threads - 1  # the paths above were taken
        for name in MANY:
            payloads, u, v = ref_payloads[name]
            for a, b in zip([step[name] for step in sent], payloads):
                assert len(a.tensors) == len(b.tensors)
                assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
            assert torch.equal(method.memory.u[name], u) and torch.equal(method.memory.v[name], v)


@needs_kernel
def test_an_accumulator_of_nan_still_gives_k_entries_in_bounds():
    """An accumulator that overflowed holds NaN, which is never a candidate: where fewer than k other entries
    remain, the first NaNs are taken too (never an index from an unfilled buffer)."""
    method = DGC(warmup_epochs=0, sparsify_all=True, wire="plain", density=0.01)
    method.sparsify({"w": torch.randn(1_000)})
    v = method.memory.v["w"]
    v.fill_(math.nan)
    method.memory.u["w"].zero_()
    v[[5, 500, 900]] = 1.0
    values, indices = method.compressor.decode(method.sparsify({"w": torch.zeros(1_000)})["w"], 1_000)
    assert indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 500, 900]
    assert values[[5, 8, 9]].tolist() == [1.0, 1.0, 1.0] and values[:5].isnan().all()


def test_the_kernels_table_and_wide_size_match_the_c_source():
    source = kernels.SOURCE.read_text()
    enum = re.search(r"enum \{(.*?)\};", source, re.S).group(1)
    assert re.findall(r"\bF_([A-Z0-9_]+)", enum) == [f.upper() for f in FIELDS] + ["FIELDS"]
    assert int(re.search(r"#define PARALLEL_MIN (\d+)", source).group(1)) == WIDE_MIN


def test_without_a_compiler_it_warns_once_and_the_torch_ops_run(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("GRADCOMP_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled kernel is unavailable.*torch ops"):
            assert kernels.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.library() is None  # cached: no second warning
            payload = DGC(warmup_epochs=0).sparsify({"w": torch.randn(100, 100)})["w"]
        assert payload.meta[1].numel() == 10
    finally:
        kernels.library.cache_clear()


def test_gradcomp_kernels_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("GRADCOMP_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


@needs_kernel
def test_float64_and_noncontiguous_gradients_take_the_torch_ops(monkeypatch):
    calls = []
    lib = kernels.library()
    monkeypatch.setattr(kernels, "library", lambda: calls.append(1) or lib)
    method = DGC(warmup_epochs=0)
    method.sparsify({"d": torch.randn(100, 100, dtype=torch.float64)})
    assert method.memory.v["d"].dtype == torch.float64  # the torch ops did the step
    assert calls == []  # not even built for tensors it cannot take
    method.sparsify({"f": torch.randn(100, 100)})
    assert len(calls) == 1


@needs_kernel
@pytest.mark.parametrize("hint", [0.0, 1e-30, 1.5, 1e30, math.nan], ids=["none", "tiny", "close", "huge", "nan"])
def test_the_hint_changes_the_speed_not_the_result(hint, monkeypatch):
    """The kernel starts each step's streaming selection from a hint (the tensor's last threshold, lowered);
    any hint, one far too high included (then v is read again), gives the torch ops' result."""
    ref, ref_memory = _run((600_000,), "normal", False, monkeypatch, steps=4)
    method = DGC(warmup_epochs=0, sparsify_all=True)
    space = method.memory.workspace
    payloads = []
    for g in _gradients("normal", (600_000,), 4):
        for plan in space.plans.values():
            plan.hints.fill_(hint)
        payloads.append(method.sparsify({"w": g})["w"])
    for a, b in zip(payloads, ref):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert torch.equal(method.memory.v["w"], ref_memory.v["w"])
    assert space.rescanned == (3 if hint == 1e30 else 0)  # the first step has no hint


def _worker_payloads(workers, n, density, seed=3):
    """Each worker's real compact DGC payload for one tensor."""
    g = torch.Generator().manual_seed(seed)
    return [DGC(warmup_epochs=0, sparsify_all=True, density=density).sparsify({"w": torch.randn(n, generator=g)})["w"]
            for _ in range(workers)]


@needs_kernel
@pytest.mark.parametrize("workers", [1, 4, 32])
@pytest.mark.parametrize("n, density", [(1, 0.001), (5_000, 0.001), (300_000, 0.01), (70_000, 0.5)])
def test_decompress_in_the_kernel_sums_exactly_what_the_torch_ops_do(workers, n, density, monkeypatch):
    payloads = _worker_payloads(workers, n, density)
    selector = DGC(sparsify_all=True, density=density).compressor
    fused = selector.decompress(payloads, torch.empty(n))
    monkeypatch.setattr(kernels, "library", lambda: None)
    assert torch.equal(fused, selector.decompress(payloads, torch.empty(n)))


@needs_kernel
def test_decompress_in_the_kernel_rejects_what_the_torch_decoder_rejects(monkeypatch):
    """Corrupt index codes: too few entries, too many, indices past the end or out of order."""
    payloads = _worker_payloads(2, 50_000, 0.01)
    selector = DGC(sparsify_all=True, density=0.01).compressor
    half, scale, code = payloads[1].tensors

    def corrupt(change):
        bad = code.clone()
        change(bad)
        return [payloads[0], payloads[1].replace(half, scale, bad)]

    low_bytes = bits.packed_nbytes(half.numel(), (50_000 // half.numel()).bit_length() - 1)

    def no_entries(c):
        c[low_bytes:] = 0

    def too_many(c):
        c[low_bytes:] = 255

    def out_of_order(c):  # equal high parts, every low part the same: repeated indices
        c[:low_bytes] = 255

    cases = [corrupt(no_entries), corrupt(too_many), corrupt(out_of_order)]
    for case in cases:
        with pytest.raises(ValueError, match="corrupt index code") as fused:
            selector.decompress(case, torch.empty(50_000))
        with monkeypatch.context() as m:
            m.setattr(kernels, "library", lambda: None)
            with pytest.raises(ValueError, match="corrupt index code") as reference:
                selector.decompress(case, torch.empty(50_000))
        assert str(fused.value) == str(reference.value)


@needs_kernel
def test_lookup_tables_and_other_weights_in_one_step_match_the_torch_ops(monkeypatch):
    """DGC's default masking spares lookup tables (most rows without gradient): the kernel then runs the tables
    and the other tensors in two calls, and sends and keeps what the torch ops do, tensor by tensor."""
    g = torch.Generator().manual_seed(3)

    def step():
        table = torch.zeros(500, 40)
        table[torch.randperm(500, generator=g)[:30]] = torch.randn(30, 40, generator=g)  # 30 rows "in the batch"
        return {"table": table, "weight": torch.randn(300, 300, generator=g), "small": torch.randn(9, 9, generator=g)}

    steps = [step() for _ in range(4)]
    results = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(kernels, "library", lambda: None)
            method = DGC(warmup_epochs=0, sparsify_all=True, density=0.01)
            results.append(([method.sparsify({k: t.clone() for k, t in s.items()}) for s in steps], method.memory))
    (fused, fused_memory), (ref, ref_memory) = results
    for a, b in zip(fused, ref):
        for name in a:
            assert all(torch.equal(x, y) for x, y in zip(a[name].tensors, b[name].tensors)), name
    for name in steps[0]:
        assert torch.equal(fused_memory.u[name], ref_memory.u[name]) and torch.equal(fused_memory.v[name],
                                                                                      ref_memory.v[name]), name
    for name, masked in (("table", False), ("weight", True)):  # where the last step sent: u kept or zeroed
        _, indices = method.compressor.decode(fused[-1][name], steps[-1][name].numel())
        kept = fused_memory.u[name].view(-1)[indices.long()]
        assert bool((kept == 0).all()) is masked and len(indices) > 0, name


def test_the_selector_keeps_nothing_and_the_memory_owns_what_the_step_keeps():
    """DGC's compressor is a pure transform (its settings alone); the scratch buffers, the kernel's plans and
    their hints are the memory's workspace, never saved, and a copied method (a rank's) gets a fresh one."""
    method = DGC(warmup_epochs=0, sparsify_all=True)
    settings = dict(vars(method.compressor))
    assert set(settings) == {"density", "sample_ratio", "wire", "min_entries"}
    grads = {"w": torch.randn(600_000), "b": torch.randn(300, 300)}
    method.sparsify(grads)
    assert vars(method.compressor) == settings
    workspace = method.memory.workspace
    if kernels.library() is not None:
        (plan,) = workspace.plans.values()
        assert plan.ns == [600_000, 90_000]
    assert set(method.state_dict()["memory"]) == {"u", "v"}
    rank = method.for_rank(1)
    assert rank.memory.workspace is not workspace and not rank.memory.workspace.plans
    assert torch.equal(rank.memory.v["w"], method.memory.v["w"])  # the state itself is copied
