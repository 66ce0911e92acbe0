"""Connection strings that may carry secrets: parsed, refused on the command line when
they carry a password (`ps` shows argv to every local user), read from files.

Both daemons take a PostgreSQL DSN (the agent its shard, the coordinator a PostgreSQL
decision log); a DSN is only ever logged or shown with its password removed
(`twopc_common.settings.describe_dsn`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from twopc_common.errors import InvalidArgument


def params(dsn: str) -> dict[str, Any]:
    """The DSN's parameters (a `key=value` string or a `postgresql://` URL)."""
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise InvalidArgument(f"malformed DSN: {exc}") from None


def refuse_password(dsn: str, flag: str, instead: str) -> str:
    """`dsn`, unless it carries a password: then an error naming where it goes."""
    if "password" in params(dsn):
        raise InvalidArgument(
            f"{flag} carries a password, which every local user can read from the process "
            f"list: {instead}"
        )
    return dsn


def read_dsn_file(path: Path, flag: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {flag}: {exc}") from exc
    params(text)
    return text
