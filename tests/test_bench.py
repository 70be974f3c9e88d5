"""``gradcomp bench``: the quick variants through the CLI, checked against figures computed here."""

import json
import math

import pytest

from gradcomp.cli import main
from gradcomp.train.models import resnet50
from helpers import compact_nbytes


def test_bench_wire_quick_counts_match_the_formats(tmp_path, capsys):
    assert main(["bench", "wire", "--out", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "bench-wire-quick.md").read_text()
    assert f"gradcomp bench wire --out {tmp_path}" in report and "❌" not in report
    variants = json.loads((tmp_path / "bench-wire-quick.json").read_text())["data"]["models"]["resnet50"]["variants"]

    params = list(resnet50().parameters())
    k = [max(1, math.ceil(p.numel() / 1000)) for p in params]
    matrix = [p.dim() > 1 and p.numel() >= 1024 for p in params]
    small = sum(4 * p.numel() for p, m in zip(params, matrix) if not m)
    plain = variants["dgc-plain"]["parts"]
    assert plain["values"] == plain["indices"] == sum(4 * kk for kk, m in zip(k, matrix) if m)
    assert plain["dense"] == small and plain["scales"] == 0
    every = variants["dgc-all"]["parts"]
    assert every["values"] == sum(2 * kk for kk in k) and every["scales"] == 4 * len(params) and every["dense"] == 0
    assert variants["dgc-all"]["bytes"] == sum(compact_nbytes(p.numel(), kk) for p, kk in zip(params, k))
    assert 4 * sum(p.numel() for p in params) / variants["dgc-all"]["bytes"] >= 1000
    assert all(v.get("inexact_payloads", 0) == 0 for v in variants.values())


def test_bench_unknown_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
