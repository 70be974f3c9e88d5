"""Print the shape of gradcomp's code: lines per layer, the longest functions and classes, the public
names without a docstring, and those whose docstring lacks an ``Args:``, ``Returns:`` or ``Raises:`` section.
Run from a checkout: ``python tools/code_shape.py [--top N]``.

Sizes are given twice: all lines, and lines of code (not blank, not only a comment, not part of a docstring).
The longest functions and classes are those with the most lines of code.

A public name is what a reader of the reference can meet: a function or class of a module whose path has no
part starting with ``_``, or a method, property or nested class of such a class (a function defined inside a
function is not one).  A method without a docstring that overrides a documented method of a base class in
the package (``compress`` of each compressor, documented on ``Compressor``) inherits that docstring, as the
manual shows it (``autodoc_inherit_docstrings``), and counts as documented.

A docstring of Google style (napoleon) has the sections its name needs: ``Args:`` where it takes arguments
(a class: those of its ``__init__``, or its dataclass fields; ``Attributes:`` does for a class too),
``Returns:`` where it returns a value (by its annotation, else by a ``return`` of a value), ``Yields:``
where it yields one, and ``Raises:`` where its body raises (a class: its ``__init__``/``__post_init__``).
Properties need no ``Returns:`` (the docstring says what the value is).
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: a layer is the first of these prefixes (relative to the checkout) a file's path starts with
LAYERS = {
    "studies (reproduce, bench)": ("src/gradcomp/reproduce", "src/gradcomp/bench", "src/gradcomp_studies"),
    "training application (train, cli)": ("src/gradcomp/train", "src/gradcomp/cli.py", "src/gradcomp/__main__.py"),
    "library": ("src/gradcomp",),
}
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
#: the section headers napoleon reads (Google style), by the need they meet
SECTIONS = {
    "Args": ("Args", "Arguments", "Parameters", "Keyword Args", "Keyword Arguments", "Other Parameters"),
    "Returns": ("Returns", "Return"),
    "Yields": ("Yields", "Yield"),
    "Raises": ("Raises",),
}


def files() -> list[Path]:
    return sorted(p for p in (ROOT / "src").rglob("*.py"))


def layer(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    return next(name for name, prefixes in LAYERS.items() if rel.startswith(prefixes))


def public(name: str) -> bool:
    return not name.startswith("_")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass
class Definition:
    """One function or class: ``name`` qualified within its module, ``owner`` the class it is defined in
    (None at module level), ``in_function`` whether some function encloses it."""

    module: str
    name: str
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    owner: ast.ClassDef | None
    in_function: bool

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def public(self) -> bool:
        return (not self.in_function and all(public(p) for p in self.name.split("."))
                and all(public(p) for p in self.module.split(".")))


def walk(tree: ast.AST, module: str, prefix: str = "", owner: ast.ClassDef | None = None,
         in_function: bool = False) -> Iterator[Definition]:
    """Every function and class of ``tree``, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (*FUNCTIONS, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            yield Definition(module, name, node, owner, in_function)
            yield from walk(node, module, name + ".", node if isinstance(node, ast.ClassDef) else None,
                            in_function or isinstance(node, FUNCTIONS))
        elif not isinstance(node, ast.expr):  # if/try/with blocks at any level hold definitions too
            yield from walk(node, module, prefix, owner, in_function)


@dataclass
class Package:
    """The classes of every module, and what each module's names refer to (its imports), so that a base
    class written ``Compressor`` or ``base.Compressor`` resolves to the class it names."""

    classes: dict[str, ast.ClassDef] = field(default_factory=dict)  # qualified name -> class
    modules: set[str] = field(default_factory=set)
    names: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> local name -> qualified name
    where: dict[int, str] = field(default_factory=dict)  # id(class node) -> its module
    sources: dict[str, list[str]] = field(default_factory=dict)  # module -> its lines

    def add(self, module: str, is_package: bool, tree: ast.Module, definitions: list[Definition]) -> None:
        self.modules.add(module)
        names = self.names.setdefault(module, {})
        package = module if is_package else module.rpartition(".")[0]
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = ".".join(p for p in (base if node.level else "", node.module or "") if p)
                for alias in node.names:
                    names[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:  # import a.b as c: c is a.b
                        names[alias.asname] = alias.name
                    else:  # import a.b: a is a
                        names[alias.name.split(".")[0]] = alias.name.split(".")[0]
        for d in definitions:
            if isinstance(d.node, ast.ClassDef) and not d.in_function:
                self.classes[d.qualname] = d.node
                self.where[id(d.node)] = module
                if "." not in d.name:
                    names[d.name] = d.qualname

    def resolve(self, qualname: str, depth: int = 0) -> ast.ClassDef | None:
        """The class ``qualname`` names, following re-exports (``gradcomp.Compressor``)."""
        if qualname in self.classes:
            return self.classes[qualname]
        module, _, attr = qualname.rpartition(".")
        if depth > 10 or module not in self.modules or attr not in self.names.get(module, {}):
            return None
        return self.resolve(self.names[module][attr], depth + 1)

    def bases(self, cls: ast.ClassDef) -> list[ast.ClassDef]:
        """The base classes of ``cls`` that are in the package."""
        module = self.where[id(cls)]
        found = []
        for base in cls.bases:
            dotted = []
            while isinstance(base, ast.Attribute):
                dotted.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name):
                continue
            head = self.names.get(module, {}).get(base.id, f"{module}.{base.id}")
            target = self.resolve(".".join([head, *dotted]))
            if target is not None:
                found.append(target)
        return found

    def inherited(self, cls: ast.ClassDef, method: str, seen: frozenset[int] = frozenset()) -> str | None:
        """The qualified name of the documented method ``method`` of a base class of ``cls`` (in the
        package) that ``cls``'s own method overrides, else None."""
        for base in self.bases(cls):
            if id(base) in seen:
                continue
            for node in base.body:
                if isinstance(node, FUNCTIONS) and node.name == method and ast.get_docstring(node):
                    return f"{self.where[id(base)]}.{base.name}.{method}"
            found = self.inherited(base, method, seen | {id(base)})
            if found:
                return found
        return None


def decorators(node: ast.AST) -> set[str]:
    names = set()
    for d in getattr(node, "decorator_list", []):
        d = d.func if isinstance(d, ast.Call) else d
        names.add(ast.unparse(d))
    return names


def own_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a function's body, not those of functions, lambdas or classes defined in it."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, (*FUNCTIONS, ast.Lambda, ast.ClassDef)):
            yield from own_nodes(child)


def is_none(expr: ast.expr | None) -> bool:
    return expr is None or (isinstance(expr, ast.Constant) and expr.value is None)


def needs(d: Definition, package: Package) -> list[str]:
    """The sections ``d``'s docstring needs (``Args``, ``Returns``, ``Yields``, ``Raises``)."""
    node = d.node
    wanted = []
    if isinstance(node, ast.ClassDef):
        inits = [n for n in node.body if isinstance(n, FUNCTIONS) and n.name in ("__init__", "__post_init__")]
        init = next((n for n in inits if n.name == "__init__"), None)
        if init is not None:
            args = init.args
            if len(args.posonlyargs + args.args) > 1 or args.kwonlyargs or args.vararg or args.kwarg:
                wanted.append("Args")
        elif any("dataclass" in dec for dec in decorators(node)) or \
                any(ast.unparse(b) in ("NamedTuple", "typing.NamedTuple") for b in node.bases):
            fields = [n for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                      and "ClassVar" not in ast.unparse(n.annotation)
                      and not (isinstance(n.value, ast.Call) and any(
                          k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                          for k in n.value.keywords))]
            lines = package.sources.get(d.module, [])
            commented = all(f.lineno >= 2 and lines[f.lineno - 2].strip().startswith("#:") for f in fields)
            if fields and not commented:  # a field with a #: comment is documented where Sphinx shows it
                wanted.append("Args")
        if any(isinstance(n, ast.Raise) and n.exc is not None for i in inits for n in own_nodes(i)):
            wanted.append("Raises")
        return wanted
    decs = decorators(node)
    prop = bool(decs & {"property", "functools.cached_property", "cached_property"})
    args = node.args
    positional = args.posonlyargs + args.args
    if d.owner is not None and "staticmethod" not in decs and positional:
        positional = positional[1:]  # self, cls
    if not prop and (positional or args.kwonlyargs or args.vararg or args.kwarg):
        wanted.append("Args")
    body = list(own_nodes(node))
    returns = [n for n in body if isinstance(n, ast.Return) and not is_none(n.value)]
    yields = [n for n in body if isinstance(n, (ast.Yield, ast.YieldFrom))]
    if yields:
        if any(not is_none(n.value) for n in yields):
            wanted.append("Yields")
        if returns:
            wanted.append("Returns")
    elif not prop:
        annotation = node.returns
        if annotation is not None:
            if not is_none(annotation) and ast.unparse(annotation) not in ("NoReturn", "typing.NoReturn", "Never"):
                wanted.append("Returns")
        elif returns:
            wanted.append("Returns")
    if any(isinstance(n, ast.Raise) and n.exc is not None for n in body):
        wanted.append("Raises")
    return wanted


def missing_sections(docstring: str, wanted: list[str], is_class: bool) -> list[str]:
    missing = []
    for need in wanted:
        headers = SECTIONS[need] + (("Attributes",) if is_class and need == "Args" else ())
        if not re.search(rf"^\s*({'|'.join(headers)}):\s*$", docstring, flags=re.M):
            missing.append(need)
    return missing


def not_code(tree: ast.Module, text: str) -> set[int]:
    """The line numbers (1-based) of ``text`` that are blank, only a comment, or part of a docstring."""
    lines = text.splitlines()
    skipped = {i for i, line in enumerate(lines, 1) if not line.strip() or line.lstrip().startswith("#")}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, *FUNCTIONS, ast.ClassDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                skipped.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return skipped


#: a layer's or a definition's size: all its lines, and its lines of code
Size = tuple[int, int]


def survey() -> tuple[dict[str, Size], list[tuple[int, int, str, str]], list[str], list[tuple[str, str]],
                      list[tuple[str, list[str]]], int]:
    """Lines per layer (all, code), sizes of the definitions (code, all, name, kind), and the public names:
    undocumented, inheriting (name, from where), lacking sections (name, which), and how many have a docstring
    of their own."""
    lines: dict[str, Size] = {name: (0, 0) for name in LAYERS}
    sized = []
    package = Package()
    parsed = []
    for path in files():
        text = path.read_text(encoding="utf-8")
        module = module_name(path)
        tree = ast.parse(text)
        skipped = not_code(tree, text)
        total, code = lines[layer(path)]
        n = len(text.splitlines())
        lines[layer(path)] = (total + n, code + n - len(skipped))
        definitions = list(walk(tree, module))
        for d in definitions:
            if not d.in_function:
                first, last = d.node.lineno, d.node.end_lineno or d.node.lineno
                code_lines = sum(1 for i in range(first, last + 1) if i not in skipped)
                sized.append((code_lines, last - first + 1, d.qualname, type(d.node).__name__))
        package.add(module, path.name == "__init__.py", tree, definitions)
        package.sources[module] = text.splitlines()
        parsed.append(definitions)
    undocumented, inheriting, lacking, documented = [], [], [], 0
    for definitions in parsed:
        for d in definitions:
            if not d.public or any(dec.endswith((".setter", ".deleter")) or dec in ("overload", "typing.overload")
                                   for dec in decorators(d.node)):
                continue
            doc = ast.get_docstring(d.node)
            if doc:
                documented += 1
                missing = missing_sections(doc, needs(d, package), isinstance(d.node, ast.ClassDef))
                if missing:
                    lacking.append((d.qualname, missing))
                continue
            source = package.inherited(d.owner, d.node.name) if d.owner is not None else None
            if source:
                inheriting.append((d.qualname, source))
            else:
                undocumented.append(d.qualname)
    return lines, sized, undocumented, inheriting, lacking, documented


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=10, help="how many of the longest to list (default 10)")
    parser.add_argument("--inheriting", action="store_true",
                        help="list the methods that inherit their docstring too")
    args = parser.parse_args()
    lines, sized, undocumented, inheriting, lacking, documented = survey()
    total = sum(n for n, _ in lines.values())
    total_code = sum(c for _, c in lines.values())
    print(f"lines per layer{'':26s} lines      code")
    for name, (n, code) in lines.items():
        print(f"  {name:36s} {n:6d} {100 * n / total:3.0f} %  {code:5d} {100 * code / total_code:3.0f} %")
    print(f"  {'all':36s} {total:6d}  {'':4s} {total_code:5d}")
    for kind in ("FunctionDef", "ClassDef"):
        print(f"\nlongest {'functions' if kind == 'FunctionDef' else 'classes'} (lines of code, all lines)")
        for code, n, name, _ in sorted((s for s in sized if s[3] == kind), reverse=True)[:args.top]:
            print(f"  {code:5d} {n:5d}  {name}")
    everyone = len(undocumented) + len(inheriting) + documented
    print(f"\npublic functions and classes without a docstring: {len(undocumented)} of {everyone} "
          f"({len(inheriting)} more inherit one from a documented method of a base class)")
    for name in undocumented:
        print(f"  {name}")
    if args.inheriting:
        print(f"\nmethods that inherit their docstring: {len(inheriting)}")
        for name, source in inheriting:
            print(f"  {name}  <- {source}")
    print(f"\npublic functions and classes whose docstring lacks a section (Args, Returns, Yields, Raises): "
          f"{len(lacking)} of {documented}")
    for name, missing in lacking:
        print(f"  {name}: {', '.join(missing)}")


if __name__ == "__main__":
    main()
