"""The import graph: no lower layer imports a higher one, the studies use the library only through public names,
and ``import gradcomp`` needs torch and numpy alone.

Layers, lowest first:

0. the library: ``gradcomp`` and its modules, but for the two below (torch and numpy at module level; an
   integration imports its framework inside its functions);
1. training from the command line, ``gradcomp.train`` (the ``train`` extra: tqdm, matplotlib, scikit-learn);
2. the studies, ``gradcomp_studies`` (``reproduce``, ``bench``);
3. the command line, ``gradcomp.cli`` and ``gradcomp.__main__``.

Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
#: third-party packages the library may import at module level
LIBRARY_NEEDS = {"torch", "numpy"}
#: what ``import gradcomp`` must not load (the train extra's packages)
EXTRAS = ("tqdm", "matplotlib", "sklearn", "greenlet")


def layer(module: str) -> int:
    if module in ("gradcomp.cli", "gradcomp.__main__"):
        return 3
    if module == "gradcomp_studies" or module.startswith("gradcomp_studies."):
        return 2
    if module == "gradcomp.train" or module.startswith("gradcomp.train."):
        return 1
    return 0


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[str, str | None, int, bool]]:
    """(module, name imported from it or None, line, at module level) for each import in ``path``."""
    return parse_imports(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def parse_imports(source: str, module: str, is_package: bool) -> list[tuple[str, str | None, int, bool]]:
    """The imports of ``source``, the text of ``module``: relative ones resolved, and ``from package import
    submodule`` counted as an import of the submodule."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source_module = ".".join(base + ([node.module] if node.module else []))
            else:
                source_module = node.module or ""
            for alias in node.names:
                sub = f"{source_module}.{alias.name}"
                found.append((sub, None, node.lineno, id(node) in top) if is_module(sub)
                             else (source_module, alias.name, node.lineno, id(node) in top))
    return found


def all_imports() -> list[tuple[str, str, str | None, int, bool]]:
    return [(module_name(p), *i) for p in sorted(SRC.rglob("*.py")) for i in imports(p)]


def ours(module: str) -> bool:
    return module.split(".")[0] in ("gradcomp", "gradcomp_studies")


def test_no_layer_imports_a_higher_one():
    upward = [f"{m} (layer {layer(m)}) imports {target} (layer {layer(target)}) at line {line}"
              for m, target, _, line, _ in all_imports() if ours(target) and layer(target) > layer(m)]
    assert not upward, "\n".join(upward)


def test_the_studies_use_only_public_names_of_gradcomp():
    private = [f"{m} imports {target}{'.' + name if name else ''} at line {line}"
               for m, target, name, line, _ in all_imports()
               if layer(m) == 2 and target.split(".")[0] == "gradcomp"
               and any(part.startswith("_") and not part.startswith("__") for part in
                       [*target.split("."), *([name] if name else [])])]
    assert not private, "\n".join(private)


def test_the_library_imports_only_torch_and_numpy_at_module_level():
    stdlib = sys.stdlib_module_names
    other = [f"{m} imports {target} at line {line}" for m, target, _, line, top in all_imports()
             if layer(m) == 0 and top and not ours(target)
             and target.split(".")[0] not in stdlib | LIBRARY_NEEDS]
    assert not other, "\n".join(other)


def test_the_checker_sees_upward_imports_and_private_names():
    """What the checks above would catch: a library module importing the training loop or the studies inside a
    function, and a study importing a private helper; ``from .. import kernels`` is the submodule."""
    found = parse_imports("def f():\n    from .train.loop import run\n    import gradcomp_studies.reproduce\n",
                          "gradcomp.kernels", False)
    assert [(target, top) for target, _, _, top in found] == [("gradcomp.train.loop", False),
                                                              ("gradcomp_studies.reproduce", False)]
    assert all(layer(target) > layer("gradcomp.kernels") for target, *_ in found)
    [(target, name, _, _)] = parse_imports("from gradcomp.train.loop import _train\n",
                                           "gradcomp_studies.reproduce.lm", False)
    assert (target, name) == ("gradcomp.train.loop", "_train")
    assert ("gradcomp.kernels", None) in {(t, n) for t, n, *_ in imports(SRC / "gradcomp" / "compressors" /
                                                                          "sparse.py")}


@pytest.mark.parametrize("code", ["import gradcomp; gradcomp.DGC(); [getattr(gradcomp, n) for n in gradcomp.__all__]"])
def test_import_gradcomp_needs_no_extra(code):
    """With the train extra's packages made unimportable, the library imports and builds a method; its
    Simulator names the missing package when it is run."""
    block = "".join(f"sys.modules[{name!r}] = None; " for name in EXTRAS)
    script = (f"import sys; {block}{code}; "
              "import torch; sim = gradcomp.Simulator(torch.nn.Linear(2, 1), 'none', 2)\n"
              "try:\n    sim.step([torch.ones(1, 2)] * 2, lambda m, b: m(b).sum())\n"
              "except ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install greenlet" in out.stdout, out.stdout


def test_the_commands_that_need_the_train_extra_say_so_in_one_line():
    """Without the train extra, ``gradcomp train`` (and reproduce, bench, plot) ends in one line naming the missing
    packages as pip installs them (those of pyproject.toml's ``train`` extra) and how to get them; ``gradcomp list``
    needs none of them."""
    from gradcomp.cli import TRAIN_EXTRA

    extra = re.search(r"^train = \[(.*)\]$", (SRC.parent / "pyproject.toml").read_text(), flags=re.M)
    assert extra is not None
    assert sorted(TRAIN_EXTRA.values()) == sorted(re.findall(r'"([a-z-]+)[<>=]', extra.group(1)))
    block = "".join(f"sys.modules[{name!r}] = None; " for name in EXTRAS)
    for argv, code in ((["train", "--epochs", "1"], 2), (["bench", "wire"], 2), (["list"], 0)):
        script = f"import sys; {block}from gradcomp.cli import main; sys.exit(main({argv!r}))"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == code, out.stderr
        if code:
            assert out.stderr.splitlines() == [
                f"gradcomp {argv[0]}: error: needs the train extra, and {', '.join(TRAIN_EXTRA.values())} are not "
                "installed: pip install 'gradcomp[train]' (or pip install -e '.[train]' in a checkout)"]
        else:
            assert "dgc" in out.stdout.split()
