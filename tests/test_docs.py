"""The manual (docs/): it builds with warnings as errors, its reference covers the public API, and every Python
example on its pages is one that tests/test_readme.py runs."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import gradcomp
from helpers import PYTHON_BLOCK, REPO, markdown_pages, python_examples

DOCS = REPO / "docs"
GUIDES = ["quickstart", "ddp-hook", "distributed-optimizer", "dga-fedavg", "integrations", "choosing", "train",
          "checkpoints", "benchmarks", "internals"]


def documented():
    """The names the API reference hands to autodoc (``.. autoclass:: gradcomp.DGC`` and the like)."""
    return set(re.findall(r"^\.\. auto\w+:: (\S+)", (DOCS / "api.md").read_text(), flags=re.M))


@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None,
                    reason="sphinx is not installed (it is in the test extra: pip install -e '.[test]')")
def test_manual_builds_without_warnings(tmp_path):
    out = tmp_path / "html"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for page in ["index", "api", *GUIDES, "reports/index", "reports/ratio"]:
        assert (out / f"{page}.html").is_file(), page
    assert 'id="gradcomp.DGC"' in (out / "api.html").read_text()


def test_every_guide_is_in_the_table_of_contents():
    index = (DOCS / "index.md").read_text()
    for guide in GUIDES:
        assert (DOCS / f"{guide}.md").is_file(), guide
        assert re.search(rf"^{re.escape(guide)}$", index, flags=re.M), f"{guide} is not in docs/index.md's toctree"


def test_every_report_has_a_page():
    for report in sorted((REPO / "results").glob("*.md")):
        page = DOCS / "reports" / report.name
        assert page.is_file(), f"results/{report.name} has no page under docs/reports/"
        assert f"../../results/{report.name}" in page.read_text()


def test_the_reference_covers_the_public_api():
    names = documented()
    missing = [name for name in gradcomp.__all__ if f"gradcomp.{name}" not in names]
    assert not missing, f"public names missing from docs/api.md: {missing}"
    for name in gradcomp.available():
        cls = type(gradcomp.get(name))
        assert {f"{cls.__module__}.{cls.__qualname__}", f"gradcomp.{cls.__qualname__}"} & names, name
    assert {"gradcomp.lightning.GradientCompression", "gradcomp.train.config.TrainConfig",
            "gradcomp.train.loop.run"} <= names
    from gradcomp.train.config import TrainConfig

    sections = {f"gradcomp.train.config.{f.default_factory.__name__}" for f in dataclasses.fields(TrainConfig)}
    assert sections <= names, f"sections of TrainConfig missing from docs/api.md: {sorted(sections - names)}"


def test_every_python_block_of_the_manual_is_run():
    plain, torchrun = python_examples(markdown_pages())
    ids = " ".join(param.id for param in plain + torchrun)
    for page in markdown_pages():
        text = page.read_text()
        fences = len(re.findall(r"^\s*```python", text, flags=re.M))
        assert fences == len(PYTHON_BLOCK.findall(text)), f"{page}: a ```python fence the tests do not collect"
        assert not re.search(r"```\{code(-block)?\}\s*python", text), f"{page}: a Python example the tests skip"
        for index in range(fences):
            assert f"{page.relative_to(REPO)}[{index}]" in ids
    assert "docs/ddp-hook.md[0]" in ids and "docs/quickstart.md[0]" in ids
