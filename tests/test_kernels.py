"""DGC's compiled kernel against the torch ops it replaces, and against an independent top-k."""

import math
import warnings

import pytest
import torch

from gradcomp import kernels
from gradcomp.compressors.base import num_selected
from gradcomp.compressors import bits
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


def _run(shape, label, fused, monkeypatch, steps=3, **options):
    """Payloads and the final memory of ``steps`` DGC steps through the kernel or the torch ops."""
    if not fused:
        monkeypatch.setattr(kernels, "library", lambda: None)
    method = DGC(warmup_epochs=0, sparsify_all=True, **options)
    payloads = [method.sparsify("w", g) for g in _gradients(label, shape, steps)]
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
                                     dict(density=0.05)], ids=["compact", "plain", "nesterov", "no-masking", "dense"])
def test_the_kernel_sends_and_keeps_exactly_what_the_torch_ops_do(shape, options, monkeypatch):
    fused, fused_memory = _run(shape, "normal", True, monkeypatch, **options)
    ref, ref_memory = _run(shape, "normal", False, monkeypatch, **options)
    for a, b in zip(fused, ref):
        assert torch.equal(a.meta[1], b.meta[1]) and torch.equal(a.meta[0], b.meta[0])
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
        payload = method.sparsify("w", g)
        values, indices = payload.meta
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
            payload = DGC(warmup_epochs=0).sparsify("w", torch.randn(100, 100))
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
    method.sparsify("d", torch.randn(100, 100, dtype=torch.float64))
    assert method.memory.v["d"].dtype == torch.float64  # the torch ops did the step
    method.sparsify("f", torch.randn(100, 100))
    assert len(calls) == 2


@needs_kernel
@pytest.mark.parametrize("hint", [0.0, 1e-30, 1.5, 1e30, math.nan], ids=["none", "tiny", "close", "huge", "nan"])
def test_the_hint_changes_the_speed_not_the_result(hint, monkeypatch):
    """The kernel starts each step's streaming selection from a hint (the tensor's last threshold, lowered);
    any hint, one far too high included (then v is read again), gives the torch ops' result."""
    ref, ref_memory = _run((600_000,), "normal", False, monkeypatch, steps=4)
    method = DGC(warmup_epochs=0, sparsify_all=True)
    space = method.compressor.workspace
    payloads = []
    for g in _gradients("normal", (600_000,), 4):
        for key in space.hints:
            space.hints[key] = hint
        payloads.append(method.sparsify("w", g))
    for a, b in zip(payloads, ref):
        assert torch.equal(a.meta[1], b.meta[1]) and all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert torch.equal(method.memory.v["w"], ref_memory.v["w"])
    assert space.rescanned == (3 if hint == 1e30 else 0)  # the first step has no hint


def _worker_payloads(workers, n, density, seed=3):
    """Each worker's real compact DGC payload for one tensor."""
    g = torch.Generator().manual_seed(seed)
    return [DGC(warmup_epochs=0, sparsify_all=True, density=density).sparsify("w", torch.randn(n, generator=g))
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
