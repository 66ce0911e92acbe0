"""The harness itself: daemons it starts do not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from twopc_harness.daemons import wait_until
from twopc_harness.postgres import PostgresCluster


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that no longer exists."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_daemons_stop_when_the_harness_that_started_them_is_killed(
    clusters: list[PostgresCluster], tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from twopc_harness.daemons import participant_daemon
        from twopc_harness.postgres import free_port
        agent = participant_daemon(
            "orphan", f"127.0.0.1:{{free_port()}}", {clusters[0].dsn!r}, {{}},
            Path({str(tmp_path / "orphan.log")!r}),
        )
        agent.start()
        print(agent.process.pid, flush=True)
        time.sleep(600)
        """
    )
    harness = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    daemon_pid = 0
    try:
        assert harness.stdout is not None
        daemon_pid = int(harness.stdout.readline())
        assert _alive(daemon_pid)
        harness.send_signal(signal.SIGKILL)
        harness.wait(10)
        wait_until(lambda: not _alive(daemon_pid), 20, "the orphaned agent to shut down")
    finally:
        if harness.poll() is None:
            harness.kill()
        if daemon_pid and _alive(daemon_pid):
            os.kill(daemon_pid, signal.SIGKILL)
    # It shut down on its own SIGTERM (cleanly), not by some other death.
    assert "event=stopping" in (tmp_path / "orphan.log").read_text()
