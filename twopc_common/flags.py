"""Command-line flags generated from a config dataclass's documented fields.

A field's docstring (the string literal under it, as in `CoordinatorConfig`) is its
flag's help and the field's default is the flag's default, so that the command line
cannot drift from the configuration it fills. README's flag tables, the third copy,
are checked against the parsers by tests/test_cli.py. `InvalidSetting` errors that a
config raises name the field; `flag_error` names the flag instead.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twopc_common.settings import InvalidSetting


def field_docs(cls: type) -> Mapping[str, str]:
    """Field name -> its docstring as one line, read from the source of the class and
    of the dataclasses it is assembled from (`CoordinatorConfig`'s groups)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_docs(klass))
    return docs


@functools.cache
def _docs(cls: type) -> Mapping[str, str]:
    (tree,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(tree, ast.ClassDef)
    docs = {}
    for node, after in zip(tree.body, tree.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass(frozen=True, slots=True)
class Flag:
    """`--name` sets the config field `field`, parsed by `type`."""

    name: str
    field: str
    type: Callable[[str], Any]
    metavar: str


def add_field_flags(
    p: Any, defaults: object, flags: Iterable[Flag], prefix: str = ""
) -> dict[str, str]:
    """Add each flag with its field's default and docstring (`p` is an
    ArgumentParser or an argument group); its value lands in `prefix + field`.
    Returns field -> flag name, for `flag_error`."""
    docs = field_docs(type(defaults))
    names = {}
    for flag in flags:
        p.add_argument(
            flag.name,
            dest=prefix + flag.field,
            type=flag.type,
            default=getattr(defaults, flag.field),
            metavar=flag.metavar,
            help=docs[flag.field].replace("%", "%%"),  # argparse %-formats help
        )
        names[flag.field] = flag.name
    return names


def field_values(args: Any, flags: Iterable[Flag], prefix: str = "") -> dict[str, Any]:
    """The parsed values of `flags`, by field name."""
    return {flag.field: getattr(args, prefix + flag.field) for flag in flags}


def flag_error(exc: Exception, flags: Mapping[str, str]) -> str:
    """The message of a config's refusal, naming the flag that set the value."""
    if isinstance(exc, InvalidSetting) and exc.setting in flags:
        return f"{flags[exc.setting]} {exc.problem}"
    return str(exc)
