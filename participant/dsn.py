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

from twopc_common import dsn as common
from twopc_common.errors import InvalidArgument

ENV_VAR = "TWOPC_DSN"


def inline_dsn(dsn: str | None, dsn_file: Path | None) -> str:
    """The DSN given by --dsn or TWOPC_DSN ("" when it is in --dsn-file, which the
    agent reads when it starts: `read_dsn_file`); exactly one of the three is given."""
    from_env = os.environ.get(ENV_VAR) or None
    given = [s for s in (dsn, dsn_file, from_env) if s is not None]
    if len(given) != 1:
        raise InvalidArgument(f"give exactly one of --dsn, --dsn-file and {ENV_VAR}")
    if dsn is not None:
        common.refuse_password(
            dsn,
            "--dsn",
            f"put the DSN in --dsn-file or {ENV_VAR}, or the password in PGPASSFILE",
        )
    return dsn or from_env or ""


def read_dsn_file(path: Path) -> str:
    return common.read_dsn_file(path, "--dsn-file")
