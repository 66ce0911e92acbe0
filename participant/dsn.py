"""Where the agent's database connection string comes from, and how it is shown.

A password never rides on the command line, where `ps` shows it to every local user:
`--dsn` must not carry one; it comes from `--dsn-file` (a file readable by the agent
only), the environment variable TWOPC_DSN, or libpq's own PGPASSFILE / PGPASSWORD.
Every other libpq parameter passes through unchanged (`sslmode=verify-full
sslrootcert=...` for TLS to PostgreSQL). A DSN is only ever logged or shown with its
password removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg

from twopc_common.errors import InvalidArgument

ENV_VAR = "TWOPC_DSN"


def inline_dsn(dsn: str | None, dsn_file: Path | None) -> str:
    """The DSN given by --dsn or TWOPC_DSN ("" when it is in --dsn-file, which the
    agent reads when it starts: `read_dsn_file`); exactly one of the three is given."""
    from_env = os.environ.get(ENV_VAR) or None
    given = [s for s in (dsn, dsn_file, from_env) if s is not None]
    if len(given) != 1:
        raise InvalidArgument(f"give exactly one of --dsn, --dsn-file and {ENV_VAR}")
    if dsn is not None and "password" in _params(dsn):
        raise InvalidArgument(
            f"--dsn carries a password, which every local user can read from the process "
            f"list: put the DSN in --dsn-file or {ENV_VAR}, or the password in PGPASSFILE"
        )
    return dsn or from_env or ""


def read_dsn_file(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read --dsn-file: {exc}") from exc
    _params(text)
    return text


def _params(dsn: str) -> dict[str, Any]:
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise InvalidArgument(f"malformed DSN: {exc}") from None
