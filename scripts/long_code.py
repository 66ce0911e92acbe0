"""List the classes and functions too long to read in one screen.

Issue 13's done condition is that the largest class or function of the daemons
(`coordinator/`, `participant/`) fits in one screen: here, a class of at most
`--class-lines` lines and a function of at most `--function-lines`, counted from
its `class`/`def` line to its last line (the lines of nested definitions
included). `make long-code` prints what is longer, longest first; with `--check`
the exit status is 1 if anything is: `make test` (CI) and `make lint` run it so.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coordinator", "participant")


@dataclass(frozen=True, slots=True)
class Definition:
    kind: str
    """'class' or 'def'."""
    name: str
    """Qualified within its module: `Class.method`, `function.inner`."""
    path: Path
    line: int
    length: int


def definitions(path: Path) -> list[Definition]:
    """Every class and function of one module, nested ones included."""
    found: list[Definition] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "def"
                assert child.end_lineno is not None
                length = child.end_lineno - child.lineno + 1
                found.append(Definition(kind, name, path, child.lineno, length))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), str(path)), "")
    return found


def too_long(root: Path, class_lines: int, function_lines: int) -> list[Definition]:
    limits = {"class": class_lines, "def": function_lines}
    every = [
        d
        for package in PACKAGES
        for p in sorted((root / package).rglob("*.py"))
        for d in definitions(p)
    ]
    return sorted((d for d in every if d.length > limits[d.kind]), key=lambda d: -d.length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--class-lines", type=int, default=120, help="longest class allowed")
    parser.add_argument("--function-lines", type=int, default=60, help="longest function allowed")
    parser.add_argument("--check", action="store_true", help="exit 1 if anything is longer")
    args = parser.parse_args(argv)
    found = too_long(ROOT, args.class_lines, args.function_lines)
    for d in found:
        where = f"{d.path.relative_to(ROOT)}:{d.line}"
        print(f"{d.length:5d} lines  {d.kind:5s} {d.name:45s} {where}")
    print(
        f"{len(found)} longer than {args.class_lines} lines (class) "
        f"or {args.function_lines} (function)"
    )
    return 1 if found and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
