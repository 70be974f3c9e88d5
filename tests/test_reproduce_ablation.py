"""`gradcomp reproduce ablation`: the quick variant through the CLI (skipped without Fashion-MNIST)."""

import pytest

from gradcomp.cli import main
from gradcomp.train.data import DatasetNotFoundError, load_dataset


def _have_fashion() -> bool:
    try:
        load_dataset("fashion-mnist", limit_train=10)
    except DatasetNotFoundError:
        return False
    return True


@pytest.mark.slow  # work in progress: the quick variant is not yet tuned to show the paper's ordering
@pytest.mark.skipif(not _have_fashion(), reason="Fashion-MNIST not found")
def test_ablation_quick_runs_and_writes_its_report(tmp_path):
    rc = main(["reproduce", "ablation", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = (tmp_path / "ablation-quick.md").read_text()
    assert "naive pruning" in report and "DGC (all techniques)" in report
    assert (tmp_path / "ablation-quick.png").read_bytes().startswith(b"\x89PNG")
