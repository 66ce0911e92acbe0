"""Running the console programs as a user would, and what every error of theirs must
look like: the exit status, one last line `PROGRAM: what is wrong`, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROGRAMS = {
    "twopc-coordinator": "coordinator",
    "twopc-participant": "participant",
    "bank-demo": "bank_demo",
}
VALID_DSN = "host=127.0.0.1 port=1 user=postgres connect_timeout=1"


def command(prog: str) -> list[str]:
    """The console script next to this Python (what a user runs), else `python -m`."""
    script = Path(sys.executable).parent / prog
    return [str(script)] if script.exists() else [sys.executable, "-m", PROGRAMS[prog]]


def cli(
    prog: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(prog), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(
    done: subprocess.CompletedProcess[str], prog: str, message: str, code: int
) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert "Traceback" not in output and "never awaited" not in output, output
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: "), output
    assert message in last, output
