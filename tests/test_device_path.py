"""The device path: the fixed-shape formulation the compressors and DGC run off the CPU, without host syncs.

No GPU runs in CI, so the default suite checks it by proxy:

* run on CPU tensors (``forced_device_path``), it sends the same bytes, decodes the same sums and leaves
  the same memory as the CPU path (which keeps its compiled kernel); the random ones draw from a generator
  of the tensor's device seeded alike, so on CPU the draws are the CPU path's, bit for bit;
* run on ``meta`` tensors, which hold no data, it succeeds: no shape depends on a value, nothing is read
  on the host (``.item()``, ``nonzero``, ``bool()`` raise there);
* a corrupt payload never raises there (that would need the host) and never writes out of bounds: the
  decoded tensor's first entry turns NaN;
* workers' payloads are summed one worker at a time, in rank order, as a sequential reference does.

The tests marked ``gpu`` (skipped without CUDA) check the same on a GPU: placement and dtypes as on the CPU,
no sync under ``torch.cuda.set_sync_debug_mode``, bit packing byte for byte, and decoding bitwise repeatable.
"""

import contextlib
import functools
import warnings

import pytest
import torch

import gradcomp
from gradcomp.compressors import bits
from gradcomp.compressors.base import Exchanged, Payload, available, forced_device_path, get
from gradcomp.compressors.sparse import AdaComp, Dryden, Threshold
from gradcomp.simulator import run_exchanges
from helpers import exchange_step

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]

# Every registered compressor, in the settings the tests run (several where a setting changes the code path).
SETTINGS = [
    ("none", {}), ("fp16", {}),
    ("topk", {"density": 0.01}), ("topk", {"density": 0.01, "wire": "compact"}),
    ("sampled-topk", {"density": 0.01}), ("sampled-topk", {"density": 0.01, "wire": "compact"}),
    ("randomk", {"density": 0.01, "seed": 5}),
    ("threshold", {"tau": 1.5}), ("dryden", {"proportion": 0.01}),
    ("onebit", {}), ("terngrad", {"seed": 3}), ("terngrad", {}), ("qsgd", {"levels": 4, "seed": 3}),
    ("powersgd", {"rank": 2}), ("powersgd", {"rank": 2, "warm_start": False}),
    ("adacomp", {"bin_size": 50}), ("adacomp", {"scale": "max"}),
    ("dorefa", {"bits": 3, "seed": 3}), ("dorefa", {"per_row": True}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in SETTINGS]
SHAPE = (300, 256)  # 76,800 entries: above sparse.SMALL, so the CPU path samples DGC's threshold
WORKERS = 3


def test_every_registered_compressor_is_covered():
    assert {name for name, _ in SETTINGS} == set(available()) - {"dgc"}


def gradients(shape=SHAPE, workers=WORKERS, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 2).to(device) for _ in range(workers)]


def combine(own: Payload, sent: list[Payload]) -> list[Payload]:
    """What a collective hands worker ``own``: the sum or maximum of every worker's tensors (one payload), or
    every worker's tensors in rank order (gather); each carries the receiver's own ``meta``."""
    if own.op == "gather":
        return [own.replace(*p.tensors) for p in sent]
    op = torch.add if own.op == "sum" else torch.maximum
    return [own.replace(*(functools.reduce(op, ts) for ts in zip(*(p.tensors for p in sent))))]


def run_exchange(compressors, tensors, states):
    """Every worker's exchange of one tensor: (each worker's Exchanged, every round's payloads per worker)."""
    gens = [c.exchange(t, s) for c, t, s in zip(compressors, tensors, states)]
    sent = [next(g) for g in gens]
    rounds = [sent]
    while True:
        out = []
        for g, own in zip(gens, sent):
            try:
                out.append(g.send(combine(own, sent)))
            except StopIteration as stop:
                out.append(stop.value)
        if isinstance(out[0], Exchanged):
            return out, rounds
        sent = out
        rounds.append(sent)


def steps(name, options, grads_per_step, device_path: bool):
    """Each step's exchanges of every worker, and the states after them, on one path."""
    compressors = [get(name, **options).for_rank(r) for r in range(WORKERS)]
    states = [{} for _ in range(WORKERS)]
    out = []
    with forced_device_path(device_path):
        for grads in grads_per_step:
            if options.get("seed", 0) is None or "seed" not in options:
                torch.manual_seed(11)  # the global generator, for those drawing from it
            results, rounds = run_exchange(compressors, grads, states)
            residuals = []
            for c, g, r in zip(compressors, grads, results):
                if c.error_feedback:
                    acc = g.clone()
                    c.subtract_sent(acc, r.sent)
                    residuals.append(acc)
            out.append((results, rounds, residuals))
    return out, states


def assert_same(a, b, what):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device, what
        assert torch.equal(a, b), f"{what} differs"
    elif isinstance(a, Payload):
        assert a.op == b.op and len(a.tensors) == len(b.tensors), what
        for i, (x, y) in enumerate(zip(a.tensors, b.tensors)):
            assert_same(x, y, f"{what} tensor {i}")
    elif isinstance(a, Exchanged):
        assert_same(a.total, b.total, f"{what} total")
        assert_same(a.sent, b.sent, f"{what} sent")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k!r}]")
    else:
        assert a == b, what


# ------------------------------------------------------------------ CPU proxies


@pytest.mark.parametrize("name, options", SETTINGS, ids=IDS)
def test_the_device_formulation_on_cpu_sends_and_decodes_what_the_cpu_path_does(name, options):
    grads = [gradients(seed=s) for s in range(2)]  # two steps: warm starts and step counters are used
    cpu, cpu_states = steps(name, options, grads, device_path=False)
    dev, dev_states = steps(name, options, grads, device_path=True)
    assert_same(dev, cpu, name)
    assert_same(dev_states, cpu_states, f"{name} state")
    for results, _, _ in cpu:  # and the sum is the workers' own: every worker got the same total
        for r in results[1:]:
            assert torch.equal(r.total, results[0].total)


DGC_SETTINGS = [{}, {"wire": "plain"}, {"nesterov": True, "clip_norm": 0.5}, {"aggregate": "shared"},
                {"momentum": 0.0}]


def dgc_step(methods, grads_per_worker):
    """One step of every worker (as helpers.exchange_step, without comparing the workers' results, which
    would read them on the host); worker 0's averages."""
    n = len(methods)
    prepared = [m.prepare(g, n) for m, g in zip(methods, grads_per_worker)]
    results, _ = run_exchanges([{name: m.exchange(name, g, n) for name, g in p.items()}
                                for m, p in zip(methods, prepared)])
    for m in methods:
        m.end_step()
    return results[0]


def dgc_grads(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv": SHAPE, "fc": (40, 30), "bias": (30,)}
    return [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(2)]


@pytest.mark.parametrize("options", DGC_SETTINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_dgc_on_the_device_path_on_cpu_steps_as_the_cpu_path_and_its_kernel_do(options):
    """Three steps of two workers: the same averages and the same u and v, bit for bit.  The CPU path runs
    the compiled kernel with DGC's sampled selection; the device path torch ops with exact top-k."""
    runs = []
    for device_path in (False, True):
        methods = [gradcomp.DGC(density=0.01, warmup_steps=0, **options).for_rank(r) for r in range(2)]
        averages = []
        with forced_device_path(device_path):
            for step in range(3):
                averages.append(exchange_step(methods, dgc_grads(step))[0])
        runs.append((averages, methods[0].memory.state_dict(), methods[1].memory.state_dict()))
    assert_same(runs[1], runs[0], "dgc")


def test_the_device_path_keeps_away_from_the_compiled_kernel(monkeypatch):
    """Else the proxies above would compare the kernel with itself."""
    from gradcomp import kernels

    monkeypatch.setattr(kernels, "library", lambda: pytest.fail("the kernel was called on the device path"))
    with forced_device_path():
        exchange_step([gradcomp.DGC(density=0.01, warmup_steps=0) for _ in range(2)], dgc_grads(0))


# ------------------------------------------------------- no data-dependent shapes

#: they send as many entries as pass: a count read on the host, by design
META_EXCLUDED = {"threshold", "dryden", "adacomp"}


@pytest.mark.parametrize("name, options", [s for s in SETTINGS if s[0] not in META_EXCLUDED],
                         ids=[i for i, s in zip(IDS, SETTINGS) if s[0] not in META_EXCLUDED])
def test_on_meta_tensors_the_device_path_reads_no_value(name, options):
    grads = [torch.empty(SHAPE, device="meta") for _ in range(WORKERS)]
    compressors = [get(name, **options).for_rank(r) for r in range(WORKERS)]
    states = [{} for _ in range(WORKERS)]
    for _ in range(2):
        results, _ = run_exchange(compressors, grads, states)
        assert results[0].total.shape == SHAPE and results[0].total.device.type == "meta"
        for c, g, r in zip(compressors, grads, results):
            if c.error_feedback:
                c.subtract_sent(g.clone(), r.sent)


@pytest.mark.parametrize("name", sorted(META_EXCLUDED))
def test_on_meta_tensors_threshold_dryden_and_adacomp_decode_without_reading_a_value(name):
    like = torch.empty(SHAPE, device="meta")
    codes = torch.empty(500, dtype=torch.int32, device="meta")
    others = {"threshold": (), "dryden": (torch.empty(2, device="meta"),), "adacomp": (torch.empty(1, device="meta"),)}
    payload = Payload((codes, *others[name]), variable=True)
    c = {"threshold": Threshold, "dryden": Dryden, "adacomp": AdaComp}[name]()
    assert c.decompress([payload, payload], like=like).device.type == "meta"


@pytest.mark.parametrize("options", DGC_SETTINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_a_dgc_step_on_meta_tensors_reads_no_value_but_the_guards_verdict(options, monkeypatch):
    """The non-finite verdict (the step's one sync, in ``prepare``) is the only value read on the host."""
    monkeypatch.setattr(gradcomp.method, "non_finite", lambda grads: [])
    methods = [gradcomp.DGC(density=0.01, warmup_steps=0, **options).for_rank(r) for r in range(2)]
    grads = [{n: torch.empty_like(g, device="meta") for n, g in worker.items()} for worker in dgc_grads(0)]
    for _ in range(2):
        averages = dgc_step(methods, grads)
        assert all(a.device.type == "meta" and a.shape == grads[0][n].shape for n, a in averages.items())


# ------------------------------------------------------------ corrupt payloads


def corruptions():
    """(name, options, a function that corrupts a real payload's values): what the CPU path rejects by
    reading values."""
    def entry(field, index, value):
        def corrupt(p):
            tensors = list(p.tensors)
            tensors[field] = tensors[field].clone()
            tensors[field].view(-1)[index] = value
            return p.replace(*tensors)
        return corrupt
    return [
        ("topk", {"density": 0.01}, entry(1, 3, SHAPE[0] * SHAPE[1])),
        ("topk", {"density": 0.01}, entry(1, 0, -1)),
        ("topk", {"density": 0.01, "wire": "compact"}, entry(2, slice(None), 255)),
        ("sampled-topk", {"density": 0.01, "wire": "compact"}, entry(2, -1, 0)),
        ("threshold", {"tau": 1.5}, entry(0, 0, 2 * SHAPE[0] * SHAPE[1])),
        ("dryden", {"proportion": 0.01}, entry(0, 0, -2)),
        ("adacomp", {}, entry(0, 0, 2 * SHAPE[0] * SHAPE[1] + 1)),
        ("terngrad", {"seed": 3}, entry(0, 0, 255)),
        ("qsgd", {"levels": 4, "seed": 3}, entry(1, 0, 255)),
    ]


@pytest.mark.parametrize("name, options, corrupt", corruptions())
def test_a_corrupt_payload_on_the_device_path_gives_nan_and_writes_nothing_out_of_bounds(name, options, corrupt):
    c = get(name, **options)
    x = gradients(workers=1)[0]
    good = run_exchange([c], [x], [{}])[0][0].sent if name == "terngrad" else c.compress(x, {})
    bad = corrupt(good)
    with pytest.raises(ValueError, match="corrupt|must lie"):  # the CPU path reads the values and raises
        c.decompress([good, bad], like=x)
    buffer = torch.full((x.numel() + 64,), 1000.0)
    like = buffer[32:32 + x.numel()].view(SHAPE)
    with forced_device_path():
        out = c.decompress([good, bad], like=like)
        reference = c.decompress([good, good], like=x)
    assert out.view(-1)[0].isnan() and bool((buffer[:32] == 1000).all() and (buffer[-32:] == 1000).all())
    assert not reference.isnan().any()


def test_a_code_of_two_leaders_in_the_shared_selection_gives_nan():
    from gradcomp.compressors.sparse import SharedSelect

    x = gradients(workers=1)[0]
    c = SharedSelect(density=0.01)
    c.lead = True
    with forced_device_path():
        gen = c.exchange(x, {})
        code = next(gen)
        sent = gen.send([code.replace(code.tensors[0] | torch.roll(code.tensors[0], 1))])  # two codes OR-ed
        with pytest.raises(StopIteration) as stop:
            gen.send([sent])
    assert stop.value.value.total.view(-1)[0].isnan()


def test_the_flagged_decoder_agrees_with_the_checking_one_on_every_single_bit_flip():
    """Each bit of a real code flipped in turn: the flag is False exactly where decode_sorted raises, the
    indices agree where it does not, and are in bounds everywhere."""
    numel, k = 3000, 40
    indices = torch.randperm(numel, generator=torch.Generator().manual_seed(1))[:k].sort().values
    code = bits.encode_sorted(indices, numel)
    flips = code.repeat(code.numel() * 8, 1)
    for b in range(code.numel() * 8):
        flips[b, b // 8] ^= 128 >> (b % 8)
    decoded, ok = bits.decode_sorted_flagged(flips, numel, k)
    assert decoded.min() >= 0 and decoded.max() < numel
    rejected = 0
    for row in range(flips.shape[0]):
        try:
            expected = bits.decode_sorted(flips[row], numel, k)
        except ValueError:
            rejected += 1
            assert not bool(bits.decode_sorted_flagged(flips[row], numel, k)[1]), f"bit {row} not flagged"
            continue
        out, row_ok = bits.decode_sorted_flagged(flips[row], numel, k)
        assert bool(row_ok) and torch.equal(out, expected)
    assert 0 < rejected < flips.shape[0] and not bool(ok)  # both kinds occur; the stack's flag covers every row


# ------------------------------------------------------ deterministic accumulation


def sequential(payload_values, payload_indices, numel):
    """The reference: each worker's contribution as a dense tensor, added one worker after another."""
    total = torch.zeros(numel)
    for values, indices in zip(payload_values, payload_indices):
        dense = torch.zeros(numel)
        dense[indices] = values.float()
        total = total + dense
    return total


@pytest.mark.parametrize("wire", ["plain", "compact"])
@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-path", "device-path"])
def test_decoding_sums_worker_by_worker_in_rank_order_bitwise(wire, device_path):
    numel, workers = 5000, 8
    c = get("topk", density=0.5, wire=wire)
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(numel, generator=g) * 10.0 ** torch.randint(-3, 4, (numel,), generator=g) * 3.0**w
             for w in range(workers)]  # magnitudes far apart: sums that round, so the order shows
    payloads = [c.compress(x) for x in grads]
    decoded = [c.decode(p, numel) for p in payloads]
    reference = sequential([v for v, _ in decoded], [i for _, i in decoded], numel)
    reverse = sequential([v for v, _ in decoded][::-1], [i for _, i in decoded][::-1], numel)
    assert not torch.equal(reference, reverse)  # the order shows in the bits: the test can tell
    with forced_device_path(device_path):
        runs = [c.decompress(payloads, like=torch.empty(numel)) for _ in range(3)]
    assert all(torch.equal(r, reference) for r in runs)


# --------------------------------------------------------------------- on CUDA


@contextlib.contextmanager
def sync_debug(mode):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def to_cuda(grads_per_step):
    return [[g.cuda() for g in grads] for grads in grads_per_step]


def placement(x):
    """Where and as what every tensor in ``x`` lies: (dtype, device type, shape)."""
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.device.type, tuple(x.shape))
    if isinstance(x, Payload):
        return (x.op, [placement(t) for t in x.tensors])
    if isinstance(x, Exchanged):
        return (placement(x.total), placement(x.sent))
    if isinstance(x, (list, tuple)):
        return [placement(y) for y in x]
    if isinstance(x, dict):
        return {k: placement(v) for k, v in x.items()}
    return x


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("name, options", SETTINGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_outputs_lie_where_and_as_the_cpu_paths_do(name, options, dtype):
    """Every payload tensor, total, residual and state tensor: the CPU path's dtype and shape, on the GPU
    (PowerSGD's step counter and random-k's generator state are host tensors on both)."""
    grads = [[g.to(dtype) for g in gradients(seed=s)] for s in range(2)]
    cpu, cpu_states = steps(name, options, grads, device_path=False)
    dev, dev_states = steps(name, options, to_cuda(grads), device_path=False)
    host = ("step", "rng")
    expected = placement((cpu, [{k: v for k, v in s.items() if k not in host} for s in cpu_states]))
    got = placement((dev, [{k: v for k, v in s.items() if k not in host} for s in dev_states]))
    assert str(got) == str(expected).replace("'cpu'", "'cuda'")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("name, options", SETTINGS, ids=IDS)
def test_cuda_compressors_never_sync(name, options):
    """One exchange of three workers, compression and decoding, under ``set_sync_debug_mode("error")``;
    threshold and dryden read their count once (the sizes of what they send), and that alone."""
    grads = to_cuda([gradients()])[0]
    compressors = [get(name, **options).for_rank(r) for r in range(WORKERS)]
    states = [{} for _ in range(WORKERS)]
    run_exchange(compressors, grads, states)  # first use: allocations, generators, warm-start factors
    if name in META_EXCLUDED:
        with sync_debug("warn"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = compressors[0]
            payload = c.compress(grads[0], states[0])
        assert sum("synchroniz" in str(w.message) for w in caught) <= 2  # nonzero: its count, then the copy
        with sync_debug("error"):
            c.decompress([payload, payload], like=grads[0])
        return
    with sync_debug("error"):
        results, _ = run_exchange(compressors, grads, states)
        for c, g, r in zip(compressors, grads, results):
            if c.error_feedback:
                c.subtract_sent(g.clone(), r.sent)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("options", DGC_SETTINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_a_cuda_dgc_step_syncs_at_most_once(options):
    """A whole DGC step of two workers (prepare, compress, exchange, decode, memory): one sync at most, the
    guard's non-finite verdict in ``prepare``."""
    methods = [gradcomp.DGC(density=0.01, warmup_steps=0, **options).for_rank(r) for r in range(2)]
    grads = [{n: g.cuda() for n, g in worker.items()} for worker in dgc_grads(0)]
    dgc_step(methods, grads)  # first step: buffers
    with sync_debug("warn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dgc_step(methods, grads)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= len(methods), syncs  # one per worker: each runs its own prepare


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("width", list(range(1, 33)))
def test_cuda_bit_packing_is_byte_identical_to_cpu(width):
    g = torch.Generator().manual_seed(width)
    codes = torch.randint(0, 2**width, (10_007,), generator=g, dtype=torch.int64)
    packed = bits.pack(codes, width)
    on_cuda = bits.pack(codes.cuda(), width)
    assert on_cuda.device.type == "cuda" and torch.equal(on_cuda.cpu(), packed)
    assert torch.equal(bits.unpack(on_cuda, width, codes.numel()).cpu(), codes)
    numel = 100_003
    indices = torch.randperm(numel, generator=g)[:width * 50].sort().values
    code = bits.encode_sorted(indices.cuda(), numel)
    assert torch.equal(code.cpu(), bits.encode_sorted(indices, numel))
    decoded, ok = bits.decode_sorted_flagged(code, numel, indices.numel())
    assert bool(ok) and torch.equal(decoded.cpu(), indices)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("wire", ["plain", "compact"])
def test_cuda_decoding_is_bitwise_identical_across_runs_and_to_cpu(wire):
    """Every rank decodes the same gathered payloads: the same bits every time (no atomics meet), and the
    CPU path's (its compiled kernel for the compact wire)."""
    numel, workers = 200_000, 8
    c = get("topk", density=0.05, wire=wire)
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(numel, generator=g) * 10.0 ** torch.randint(-3, 4, (numel,), generator=g)
             for _ in range(workers)]
    payloads = [c.compress(x) for x in grads]
    reference = c.decompress(payloads, like=grads[0])
    on_cuda = [p.replace(*(t.cuda() for t in p.tensors)) for p in payloads]
    runs = [c.decompress(on_cuda, like=grads[0].cuda()) for _ in range(5)]
    assert all(torch.equal(r.cpu(), reference) for r in runs)
