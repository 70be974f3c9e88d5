"""Malformed payloads: every registered compressor's decoder checks what it received.

Each compressor's real payload is corrupted field by field (a tensor dropped or added, a field truncated,
its dtype changed, an index out of range or negative, bit-packed codes cut short or holding codes no
encoder writes); decoding must raise a ValueError naming the field, and nothing around the tensors
involved may be written.  ``like`` and the accumulator of ``subtract_sent`` are views into a larger
guarded buffer, so a write past their ends would show.
"""

import dataclasses

import pytest
import torch

import gradcomp
from gradcomp.compressors.base import available, get
from gradcomp.compressors.powersgd import PowerSGD
from gradcomp.compressors.sparse import SharedSelect

SHAPE = (40, 30)
GUARD = 1000.0  # the value around the tensors; no decode may touch it

OPTIONS = {"sampled-topk": {"density": 0.05}, "topk": {"density": 0.05}, "randomk": {"density": 0.05},
           "threshold": {"tau": 0.5}, "dryden": {"proportion": 0.05}, "qsgd": {"levels": 4, "bucket_size": 64},
           "terngrad": {"seed": 1}, "dorefa": {"bits": 3, "seed": 1}}


def gradient():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def guarded(shape=SHAPE):
    """A zero tensor of ``shape`` that is a view into the middle of a buffer full of GUARD: (view, buffer)."""
    n = torch.Size(shape).numel()
    buf = torch.full((n + 64,), GUARD)
    buf[32:32 + n] = 0.0
    return buf[32:32 + n].view(shape), buf


def untouched(buf, n):
    return bool((buf[:32] == GUARD).all()) and bool((buf[32 + n:] == GUARD).all())


def compressor(name, **extra):
    return get(name, **{**OPTIONS.get(name, {}), **extra})


def real_payload(name, **extra):
    """(compressor, a payload it decodes: compress() for single-round methods, exchange()'s sent otherwise)."""
    c = compressor(name, **extra)
    x = gradient()
    if name in ("terngrad", "powersgd"):
        return c, exchange_alone(c, x).sent
    return c, c.compress(x, {})


def exchange_alone(c, x):
    """Run ``c.exchange`` as the only worker; each round receives its own payload."""
    gen = c.exchange(x, {})
    payload = next(gen)
    while True:
        try:
            payload = gen.send([payload])
        except StopIteration as stop:
            return stop.value


def with_tensors(p, *tensors):
    return dataclasses.replace(p, tensors=tuple(tensors))


def assert_rejected(c, bad, match):
    """decompress raises ValueError(match) and writes nothing; so does subtract_sent where it decodes tensors."""
    like, buf = guarded()
    with pytest.raises(ValueError, match=match):
        c.decompress(bad, like=like)
    assert untouched(buf, like.numel()) and bool((like == 0).all())
    uses_meta = isinstance(bad[0].meta, tuple) if bad else False  # sparse: the sender's own indices, kept locally
    if bad and not uses_meta and bad[0].meta is None:
        acc, buf = guarded()
        with pytest.raises(ValueError, match=match):
            c.subtract_sent(acc, bad[0])
        assert untouched(buf, acc.numel()) and bool((acc == 0).all())


# every field of every payload: (tensor index, what it is).  Variable-length fields are marked: cutting
# them short is a smaller, still valid payload.
FIELDS = {
    "none": [(0, "values")], "fp16": [(0, "values")],
    "topk": [(0, "values"), (1, "indices")], "sampled-topk": [(0, "values"), (1, "indices")],
    "randomk": [(0, "values")],
    "threshold": [(0, "codes*")], "dryden": [(0, "codes*"), (1, "means")],
    "onebit": [(0, "packed"), (1, "values")], "terngrad": [(0, "packed"), (1, "scale")],
    "qsgd": [(0, "norms"), (1, "packed")], "powersgd": [(0, "P"), (1, "Q")],
    "adacomp": [(0, "codes*"), (1, "scale")], "dorefa": [(0, "scales"), (1, "packed")],
}
NAMES = [name for name in available() if name != "dgc"]  # the compressors; DGC sends sampled-topk's payloads


def test_every_registered_compressor_is_covered():
    assert set(FIELDS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_the_real_payload_decodes(name):
    c, p = real_payload(name)
    like, buf = guarded()
    out = c.decompress([p], like=like)
    assert out.shape == like.shape and untouched(buf, like.numel())


@pytest.mark.parametrize("name", NAMES)
def test_no_payload_at_all(name):
    c, _ = real_payload(name)
    assert_rejected(c, [], "expected at least 1 payload, got 0")


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_missing_or_one_too_many(name):
    c, p = real_payload(name)
    assert_rejected(c, [with_tensors(p, *p.tensors[:-1])], "tensor")
    assert_rejected(c, [with_tensors(p, *p.tensors, p.tensors[0])], "tensor")


@pytest.mark.parametrize("name, field, what", [(n, i, w) for n in NAMES for i, w in FIELDS[n] if not w.endswith("*")])
def test_a_truncated_field(name, field, what):
    c, p = real_payload(name)
    tensors = list(p.tensors)
    t = tensors[field]
    tensors[field] = t[:-1] if t.dim() else t.reshape(1)[:0]
    assert_rejected(c, [with_tensors(p, *tensors)], "corrupt|expected|need|take")
    tensors[field] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]]).reshape(-1)  # one entry too many
    assert_rejected(c, [with_tensors(p, *tensors)], "corrupt|expected|need|take")


@pytest.mark.parametrize("name, field, what", [(n, i, w) for n in NAMES for i, w in FIELDS[n]])
def test_a_field_of_the_wrong_dtype(name, field, what):
    c, p = real_payload(name)
    tensors = list(p.tensors)
    t = tensors[field]
    # floats become integers, integers (indices, packed codes) become floats
    tensors[field] = t.to(torch.int64) if t.is_floating_point() else t.to(torch.float64)
    assert_rejected(c, [with_tensors(p, *tensors)], "dtype")


@pytest.mark.parametrize("name", ["topk", "sampled-topk"])
@pytest.mark.parametrize("index, message", [(SHAPE[0] * SHAPE[1], "got an index of 1200 .out of range"),
                                            (-1, "got an index of -1 .out of range"),
                                            (2**31 - 1, "out of range")])
def test_sparse_indices_out_of_range(name, index, message):
    c, p = real_payload(name)
    values, indices = p.tensors
    bad = indices.clone()
    bad[len(bad) // 2] = index
    assert_rejected(c, [p, with_tensors(p, values, bad)], f"indices must lie in \\[0, 1200\\).*{message}")


@pytest.mark.parametrize("name", ["threshold", "dryden", "adacomp"])
@pytest.mark.parametrize("code", [2 * 1200, 2 * 1200 + 1, -1, -2])
def test_signed_codes_out_of_range(name, code):
    c, p = real_payload(name)
    codes = p.tensors[0].clone()
    codes[0] = code
    assert_rejected(c, [with_tensors(p, codes, *p.tensors[1:])], f"codes .* must lie in \\[0, 2400\\).*got {code}")


@pytest.mark.parametrize("name", ["topk", "sampled-topk"])
def test_compact_wire_corrupt_codes(name):
    c, p = real_payload(name, wire="compact")
    half, scale, code = p.tensors
    assert_rejected(c, [with_tensors(p, half, scale, code[:-1])], "take")
    assert_rejected(c, [p, with_tensors(p, half, scale, torch.full_like(code, 255)), p], "corrupt index code")
    assert_rejected(c, [with_tensors(p, half.float(), scale, code)], "values dtype must be torch.float16")
    assert_rejected(c, [with_tensors(p, half, scale.double(), code)], "scale dtype must be torch.float32")
    assert_rejected(c, [with_tensors(p, half, torch.ones(2), code)], "2 scales")
    assert_rejected(c, [with_tensors(p, half, scale, code.to(torch.int16))], "index code dtype must be torch.uint8")
    assert_rejected(c, [with_tensors(p, half.view(1, -1), scale, code)], "values dimension must be 1")


@pytest.mark.parametrize("name, width, top", [("terngrad", 2, 2), ("qsgd", 4, 8)])
def test_packed_codes_no_encoder_writes(name, width, top):
    """2-bit TernGrad codes are 0..2 and QSGD's (levels 4) 0..8; a 3 (or a 15) would decode to a value
    beyond the scale."""
    c, p = real_payload(name)
    field = 0 if name == "terngrad" else 1
    tensors = list(p.tensors)
    packed = tensors[field].clone()
    packed[0] = 255
    tensors[field] = packed
    assert_rejected(c, [with_tensors(p, *tensors)], f"packed codes must lie in \\[0, {top}\\], got {(1 << width) - 1}")


def test_onebit_values_of_the_wrong_shape():
    c, p = real_payload("onebit")
    packed, values = p.tensors
    assert_rejected(c, [with_tensors(p, packed, values.t())], "values of shape \\(2, 30\\)")


def test_randomk_value_count_must_match_the_shared_indices():
    c, p = real_payload("randomk")
    assert_rejected(c, [with_tensors(p, p.tensors[0][:-1])], "values size must be 60, got 59")


def test_powersgd_factors_of_the_wrong_shape():
    c, p = real_payload("powersgd")
    p_hat, q = p.tensors
    assert_rejected(c, [with_tensors(p, q, p_hat)], "P shape must be \\(40, 1\\), got \\(30, 1\\)")
    assert_rejected(c, [with_tensors(p, p_hat, torch.cat([q, q], 1))], "Q shape must be \\(30, 1\\), got \\(30, 2\\)")
    assert_rejected(c, [with_tensors(p, p_hat.view(-1), q)], "P dimension must be 2")


def test_powersgd_exchange_rejects_received_factors_of_the_wrong_shape():
    x = gradient()
    for round_, bad, match in [(0, torch.zeros(30, 1), "P shape must be \\(40, 1\\)"),
                               (1, torch.zeros(40, 1), "Q shape must be \\(30, 1\\)"),
                               (0, torch.zeros(40, 1, dtype=torch.float64), "P dtype")]:
        gen = PowerSGD(rank=1).exchange(x, {})
        payload = next(gen)
        with pytest.raises(ValueError, match=match):
            for _ in range(round_):
                payload = gen.send([payload])
            gen.send([with_tensors(payload, bad)])
    gen = PowerSGD(rank=1).exchange(torch.zeros(5), {})  # dense: one round
    payload = next(gen)
    with pytest.raises(ValueError, match="dense values size must be 5, got 4"):
        gen.send([with_tensors(payload, torch.zeros(4))])


def test_terngrad_exchange_rejects_a_bad_shared_scale_and_bad_codes():
    x = gradient()
    gen = gradcomp.get("terngrad").exchange(x, {})
    scale = next(gen)
    with pytest.raises(ValueError, match="scale size must be 1, got 2"):
        gen.send([with_tensors(scale, torch.ones(2))])
    gen = gradcomp.get("terngrad").exchange(x, {})
    codes = gen.send([next(gen)])
    with pytest.raises(ValueError, match="packed codes size must be 300, got 299"):
        gen.send([codes, with_tensors(codes, codes.tensors[0][:-1])])
    gen = gradcomp.get("terngrad").exchange(x, {})
    codes = gen.send([next(gen)])
    with pytest.raises(ValueError, match="expected at least 1 payload"):
        gen.send([])


def test_shared_selection_rejects_values_of_the_wrong_size():
    x = gradient().view(-1)
    c = SharedSelect(density=0.05)
    c.lead = True
    gen = c.exchange(x, {})
    code = next(gen)
    sent = gen.send([code])
    with pytest.raises(ValueError, match="values size must be 60, got 59"):
        gen.send([with_tensors(sent, sent.tensors[0][:-1])])
    gen = c.exchange(x, {})
    code = next(gen)
    with pytest.raises(ValueError, match="corrupt index code|take"):
        gen.send([with_tensors(code, torch.full_like(code.tensors[0], 255))])
