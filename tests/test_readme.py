"""The examples of the README and of the manual (docs/) run as written: plain Python blocks in-process,
``# run with: torchrun ...`` blocks under torchrun with 2 processes."""

import shutil

import pytest

from helpers import REPO, markdown_pages, python_examples, run_torchrun_example

README = REPO / "README.md"
PLAIN, TORCHRUN = python_examples(markdown_pages())


def test_readme_has_a_quick_start_of_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in quick.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "gradcomp train" in lines[0] and "pytest" in lines[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert lines[1].split("#")[0].strip() in ci


@pytest.mark.parametrize("block", PLAIN)
def test_python_example(block, request):
    exec(compile(block, request.node.callspec.id, "exec"), {})


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("block", TORCHRUN)
def test_torchrun_example(block, tmp_path):
    proc = run_torchrun_example(block, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outlived destroy_process_group" not in proc.stderr  # gloo's threads ended: no abort at exit
    assert proc.stdout.count("bytes") == 2  # both ranks reported


def test_cli_lists_every_compressor(capsys):
    import gradcomp
    from gradcomp.cli import main

    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == gradcomp.available()


def test_cli_rejects_bad_density(capsys):
    from gradcomp.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--density", "2"])
    assert "must be in (0, 1]" in capsys.readouterr().err
