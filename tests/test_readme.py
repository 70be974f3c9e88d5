"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_cli_lists_every_compressor(capsys):
    import gradcomp
    from gradcomp.cli import main

    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == gradcomp.available()


def test_cli_rejects_bad_density(capsys):
    from gradcomp.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--density", "2"])
    assert "must be in (0, 1]" in capsys.readouterr().err
