"""Print the shape of gradcomp's code: lines per layer, the longest functions and classes, and the public
names without a docstring.  Run from a checkout: ``python tools/code_shape.py [--top N]``."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: a layer is the first of these prefixes (relative to the checkout) a file's path starts with
LAYERS = {
    "studies (reproduce, bench)": ("src/gradcomp/reproduce", "src/gradcomp/bench", "src/gradcomp_studies"),
    "training application (train, cli)": ("src/gradcomp/train", "src/gradcomp/cli.py", "src/gradcomp/__main__.py"),
    "library": ("src/gradcomp",),
}


def files() -> list[Path]:
    return sorted(p for p in (ROOT / "src").rglob("*.py"))


def layer(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    return next(name for name, prefixes in LAYERS.items() if rel.startswith(prefixes))


def public(name: str) -> bool:
    return not name.startswith("_")


def walk(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and class, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from walk(node, name + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=10, help="how many of the longest to list (default 10)")
    args = parser.parse_args()
    lines: dict[str, int] = {name: 0 for name in LAYERS}
    sized, undocumented, documented = [], [], 0
    for path in files():
        text = path.read_text(encoding="utf-8")
        lines[layer(path)] += len(text.splitlines())
        module = path.relative_to(ROOT / "src").with_suffix("").as_posix().replace("/", ".")
        for name, node in walk(ast.parse(text)):
            sized.append((node.end_lineno - node.lineno + 1, f"{module}.{name}", type(node).__name__))
            parts = name.split(".")
            if all(public(p) for p in parts) and not module.split(".")[-1].startswith("_"):
                if ast.get_docstring(node):
                    documented += 1
                else:
                    undocumented.append(f"{module}.{name}")
    total = sum(lines.values())
    print("lines per layer")
    for name, n in lines.items():
        print(f"  {name:38s} {n:6d}  {100 * n / total:5.1f} %")
    print(f"  {'all':38s} {total:6d}")
    for kind in ("FunctionDef", "ClassDef"):
        print(f"\nlongest {'functions' if kind == 'FunctionDef' else 'classes'}")
        for n, name, _ in sorted((s for s in sized if s[2] == kind), reverse=True)[:args.top]:
            print(f"  {n:5d}  {name}")
    print(f"\npublic functions and classes without a docstring: {len(undocumented)} of "
          f"{len(undocumented) + documented}")
    for name in undocumented:
        print(f"  {name}")


if __name__ == "__main__":
    main()
