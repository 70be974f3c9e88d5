"""The README's examples run as written: plain Python blocks in-process, torchrun blocks under torchrun."""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TORCHRUN = [b for b in BLOCKS if b.startswith("# run with: torchrun")]
PLAIN = [b for b in BLOCKS if not b.startswith("# run with: torchrun")]


def test_readme_has_a_quick_start_of_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in quick.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "gradcomp train" in lines[0] and "pytest" in lines[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert lines[1].split("#")[0].strip() in ci


@pytest.mark.parametrize("index", range(len(PLAIN)))
def test_readme_python_example(index):
    exec(compile(PLAIN[index], f"README.md[python block {index}]", "exec"), {})


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("index", range(len(TORCHRUN)))
def test_readme_torchrun_example(index, tmp_path):
    block = TORCHRUN[index]
    command = block.splitlines()[0].removeprefix("# run with: ").split()
    script = tmp_path / command[-1]
    script.write_text(block)
    proc = subprocess.run(command[:-1] + [str(script)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
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
