"""Checks of configuration values, shared by the command lines (at parse time) and the
config dataclasses (`__post_init__`), so a daemon built from code is held to the same
rules as one started from a shell: addresses are HOST:PORT, durations are finite
numbers of seconds, a DSN is one libpq accepts, and a DSN is never shown with its
password.

Every check raises `InvalidArgument` with a message that names the setting.
"""

from __future__ import annotations

import math
import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from twopc_common.errors import InvalidArgument

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>[0-9]{1,5})$")
_SECRET_KEYS = ("password",)


class InvalidSetting(InvalidArgument):
    """One setting's value is refused: `setting` names it (a config field), `problem`
    says what is wrong, so that a command line can name its flag instead."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem


def host_port(name: str, address: str) -> str:
    """`address` if it is HOST:PORT with a port 1-65535 (IPv6 hosts in brackets)."""
    match = _HOST_PORT.match(address)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise InvalidSetting(
            name,
            f"{address!r}: expected HOST:PORT with a port 1-65535 "
            "(for example 127.0.0.1:7000 or [::1]:7000)",
        )
    return address


def seconds(name: str, value: float, *, zero_ok: bool = False) -> float:
    """A finite, positive (or, with `zero_ok`, non-negative) number of seconds."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        wanted = "a finite number of seconds >= 0" if zero_ok else "a finite number of seconds > 0"
        raise InvalidSetting(name, f"must be {wanted}, not {value}")
    return value


def durations(config: object, *names: str) -> None:
    """`seconds` of each of `config`'s fields `names`: positive and finite."""
    for name in names:
        seconds(name, getattr(config, name))


def count(name: str, value: int, *, least: int = 1) -> int:
    """A whole number >= `least`."""
    if value < least:
        raise InvalidSetting(name, f"must be at least {least}, not {value}")
    return value


def dsn(name: str, text: str) -> str:
    """`text` if libpq can parse it as a connection string (keywords or a URI)."""
    try:
        conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparsable"
        raise InvalidArgument(
            f"{name} is not a libpq connection string ({first}); expected for example "
            "'host=db1 port=5432 dbname=bank user=app' or postgresql://app@db1/bank"
        ) from None
    return text


def redact(text: str) -> str:
    """`text` (a DSN, or a message that quotes one) with every password masked: the one
    way anything that may show a DSN is made safe to log or print."""
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
    # URI form: postgresql://user:secret@host/db
    return re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def one_line(text: str) -> str:
    """A message of several lines (libpq adds hints on lines of their own) as one."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def describe_dsn(text: str) -> str:
    """Where a DSN points, without secrets: `host=... port=... dbname=... user=...`
    (libpq's defaults where the DSN leaves a field out)."""
    try:
        params = conninfo_to_dict(text)
    except psycopg.ProgrammingError:
        return redact(text)
    shown = {
        "host": params.get("host") or params.get("hostaddr") or "(local socket)",
        "port": params.get("port") or "5432",
        "dbname": params.get("dbname") or params.get("user") or "(user name)",
        "user": params.get("user") or "(login user)",
    }
    return " ".join(f"{k}={v}" for k, v in shown.items())
