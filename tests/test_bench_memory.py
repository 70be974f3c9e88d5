"""``gradcomp bench memory``: its helpers against hand-computed figures, and the quick variant's behaviour."""

import json
import sys

import pytest

from gradcomp.cli import main
from gradcomp_studies.bench.memory import PY_TOLERANCE_KB, TOLERANCE_MB, growth_after, read_rss_mb, trend


def test_growth_after_is_the_running_peaks_growth_past_warmup():
    # peak of the first 3 samples: 102; of all: 103 -> +1 MB, 1 / 102 of it
    grown, pct = growth_after([100.0, 102.0, 101.0, 101.5, 103.0, 102.5], 3)
    assert grown == pytest.approx(1.0) and pct == pytest.approx(100.0 / 102.0)
    # falling after warm-up is no growth
    assert growth_after([100.0, 104.0, 99.0, 98.0], 2) == (0.0, 0.0)
    assert growth_after([5.0], 1) == (0.0, 0.0)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="warmup"):
            growth_after([1.0, 2.0, 3.0, 4.0], bad)


def test_trend_is_the_least_squares_slope():
    assert trend([3.0, 5.0, 7.0, 9.0]) == pytest.approx(2.0)
    # x = 0..3 (mean 1.5), y = 1, 1, 2, 4 (mean 2): sxy = (-1.5)(-1) + (-0.5)(-1) + (0.5)(0) + (1.5)(2) = 5,
    # sxx = 2.25 + 0.25 + 0.25 + 2.25 = 5, slope 1
    assert trend([1.0, 1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert trend([7.0]) == 0.0 and trend([]) == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_read_rss_sees_an_allocation_and_the_peak_keeps_it():
    before, peak_before = read_rss_mb()
    assert 0 < before <= peak_before
    # 256 MB written by this thread (bytes * n is one memset here, where torch.ones may fill the pages from its
    # OpenMP threads, on CPUs whose share of the kernel's per-CPU RSS counters may not have been folded in yet)
    big = b"\x01" * (256 * 2**20)
    during, peak_during = read_rss_mb()
    assert during - before > 192 and peak_during >= during
    del big
    after, peak_after = read_rss_mb()
    # the high-water mark stays (within the kernel's approximate per-CPU RSS counters: a fraction of a MB)
    assert peak_after > peak_during - 1 and peak_after - after > 128


@pytest.mark.slow  # 15 s; the growth and trend helpers it relies on are tested above
def test_bench_memory_quick_dgc_memory_stops_growing_after_warmup(tmp_path):
    assert main(["bench", "memory", "--out", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "bench-memory-quick.md").read_text()
    assert f"gradcomp bench memory --out {tmp_path}" in report and "❌" not in report
    assert "| method | rank | peak RSS at warm-up end (MB) | peak RSS at end (MB) |" in report
    assert (tmp_path / "bench-memory-quick.png").stat().st_size > 0

    data = json.loads((tmp_path / "bench-memory-quick.json").read_text())["data"]
    steps, warmup = data["steps"], data["warmup"]
    for method in ("dgc", "none"):
        assert len(data["runs"][method]) == 2  # two real ranks
        for run in data["runs"][method]:
            assert len(run["rss_mb"]) == len(run["peak_mb"]) == steps
            # recomputed here from the raw samples: the peak at the end against the peak at the end of warm-up
            assert max(run["peak_mb"]) - max(run["peak_mb"][:warmup]) < TOLERANCE_MB
            live = run["live_kb"]
            first = warmup // data["collect_every"]
            assert max(live[first:]) - live[first] < PY_TOLERANCE_KB
    for run in data["runs"]["dgc"]:  # the warm-up ended inside the run and DGC trained
        assert run["density"] == 0.001 and run["loss_last"] < run["loss_first"]
