"""The examples of the API reference (docs/api.md, generated from the docstrings): every ``>>>`` example in
gradcomp's modules runs, in this one process and without a process group (doctest), and every public name
(``gradcomp.__all__``) has an ``Example:`` section."""

import ast
import doctest
import importlib
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gradcomp
from gradcomp.compressors import base

# Temporary exemptions: modules whose public names do not yet have the sections this test asks for (none left;
# add a module here only while its docstrings are being rewritten).
PENDING_MODULES: set[str] = set()
PENDING_NAMES: set[str] = set()
# The public names whose only example needs several processes (torchrun) or a GPU: a ``.. code-block:: python``
# that is shown, not run.  Keep this set small (every one runs today, in a process group of one at most).
NOT_RUN: set[str] = set()

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = re.compile(r"^\s*Examples?:\s*$", flags=re.M)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def modules():
    """The modules of gradcomp (not ``__main__``, which runs the CLI when imported)."""
    found = ["gradcomp"]
    for info in pkgutil.walk_packages(gradcomp.__path__, "gradcomp."):
        if not info.name.endswith("__main__"):
            found.append(info.name)
    return sorted(found)


def source(name):
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", [m for m in modules() if m not in PENDING_MODULES])
def test_docstring_examples_run(name):
    if ">>>" not in source(name):
        return  # no example: importing is not needed (gradcomp.lightning takes seconds to import)
    module = importlib.import_module(name)
    assert not dist.is_initialized(), "a process group is left from an earlier test: the examples make their own"
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report, left = [], []
    registry = dict(base._REGISTRY)
    for test in finder.find(module, name, globs={}):
        torch.manual_seed(0)
        try:
            runner.run(test, out=report.append, clear_globs=True)
        finally:  # an example may register a compressor of its own; one that fails may leave its process group
            base._REGISTRY.clear()
            base._REGISTRY.update(registry)
            if dist.is_initialized():
                dist.destroy_process_group()
                left.append(test.name)
    assert runner.failures == 0, "".join(report)
    assert not left, f"examples that leave a process group behind: {left}"


def test_every_public_name_has_an_example():
    missing, shown = [], []
    for name in gradcomp.__all__:
        if name == "__version__" or name in PENDING_NAMES:
            continue
        doc = getattr(gradcomp, name).__doc__ or ""
        match = EXAMPLE.search(doc)
        if not match:
            missing.append(name)
        elif ">>>" not in doc[match.end():]:
            assert ".. code-block:: python" in doc[match.end():], f"{name}: an Example without code"
            shown.append(name)
    assert not missing, f"public names without an Example: section: {missing}"
    assert set(shown) == NOT_RUN, f"examples that are not run: {sorted(shown)}; expected {sorted(NOT_RUN)}"


#: entries of the API reference whose example is shown (``Example::``), not run, with the reason: each is run
#: elsewhere in the tests
SHOWN_ONLY = {
    # two Lightning DDP processes; docs/integrations.md's torchrun example of the callback runs in test_readme.py
    "gradcomp.lightning.GradientCompression",
    # torch.distributed.checkpoint and Accelerate across ranks: docs/integrations.md's torchrun examples of both
    # run in test_readme.py
    "gradcomp.checkpoint.RankState",
    "gradcomp.checkpoint.register_with_accelerate",
}


def reference_docstring(name):
    """The docstring of a dotted name of the API reference: read from its module's source where the module defines
    it at top level (so gradcomp.lightning, slow to import, is not imported), else from the imported object."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if importlib.util.find_spec(module) is None:
            continue
        tree = ast.parse(source(module))
        nodes = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == parts[cut]]
        if nodes and len(parts) == cut + 1:
            return ast.get_docstring(nodes[0]) or ""
        obj = importlib.import_module(module)
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj.__doc__ or ""
    raise AssertionError(f"{name} is not in an importable module")


def test_every_entry_of_the_api_reference_has_an_example():
    """Every class and function docs/api.md documents (``.. autoclass::``, ``.. autofunction::``; not the data)
    has an ``Example:`` section with a ``>>>`` example, which test_docstring_examples_run runs, or one that says
    "See :func:`other`", whose example calls it; the few shown and not run are :data:`SHOWN_ONLY`."""
    entries = re.findall(r"^\.\. auto(class|function|method|exception):: (\S+)", (REPO / "docs" / "api.md").read_text(),
                         flags=re.M)
    assert len(entries) > 40
    missing, shown = [], []
    for _, name in entries:
        doc = reference_docstring(name)
        match = EXAMPLE.search(doc)
        example = doc[match.end():] if match else ""
        other = re.match(r"\s*See :func:`([\w.]+)`", example)  # another entry's example, which calls this one
        if other:
            target = other[1] if "." in other[1] else f"{name.rpartition('.')[0]}.{other[1]}"
            calls = [line for line in reference_docstring(target).splitlines() if ">>>" in line]
            if not any(f"{name.rpartition('.')[2]}(" in line for line in calls):
                missing.append(name)
        elif ">>>" in example:
            continue
        elif re.search(r"^\s*Examples?::\s*$", doc, flags=re.M) or ".. code-block:: python" in example:
            shown.append(name)
        else:
            missing.append(name)
    assert not missing, f"entries of the API reference without a run example: {missing}"
    assert set(shown) == SHOWN_ONLY, f"examples that are shown, not run: {sorted(shown)}"


def test_the_exemptions_are_still_needed():
    """The temporary exemptions name real modules and public names (drop them as the work lands)."""
    assert PENDING_MODULES <= set(modules())
    assert PENDING_NAMES <= set(gradcomp.__all__)
    for name in PENDING_NAMES:
        module = getattr(gradcomp, name).__module__
        assert module in PENDING_MODULES, f"{name} is defined in {module}, which is not exempt"


def test_every_public_name_has_its_sections():
    """``tools/code_shape.py``'s lists, for every module of ``gradcomp`` and ``gradcomp_studies`` not exempt: no
    public function or class without a docstring, and none whose docstring lacks the Args, Returns, Yields or
    Raises section its signature and body call for."""
    spec = importlib.util.spec_from_file_location("code_shape", REPO / "tools" / "code_shape.py")
    shape = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = shape  # its dataclasses look their module up there
    spec.loader.exec_module(shape)
    _, _, undocumented, _, lacking, _ = shape.survey()
    pending = tuple(f"{module}." for module in PENDING_MODULES)

    def done(name):  # the library, the training application, and the studies and benchmarks
        return name.startswith(("gradcomp.", "gradcomp_studies.")) and not name.startswith(pending)

    assert not [name for name in undocumented if done(name)], "public names without a docstring"
    assert not [(name, sections) for name, sections in lacking if done(name)], "docstrings lacking a section"
