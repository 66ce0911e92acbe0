"""The participant agent's configuration: every timeout and limit, named and documented."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twopc_common.limits import Limits
from twopc_common.tls import TlsConfig


@dataclass(frozen=True, slots=True)
class ParticipantConfig:
    id: str
    """This participant's name; the coordinator enlists it by this name."""
    dsn: str
    """libpq connection string of the PostgreSQL database this agent wraps ("" while
    it is still in `dsn_file`)."""
    dsn_file: Path | None = None
    """File the DSN is read from at start (it may carry the password)."""
    listen: str = "127.0.0.1:7001"
    """HOST:PORT the gRPC server binds."""
    coordinators: dict[str, str] = field(default_factory=dict)
    """Coordinator id -> HOST:PORT, asked for the outcome of in-doubt branches."""
    pool_min_size: int = 2
    """Connections the pool keeps open."""
    pool_max_size: int = 20
    """Most connections the pool opens; one per branch at work."""
    interactive_reserve: int = 4
    """Branch connections interactive branches may never take: kept for one-shot
    work. Opening an interactive branch beyond `pool_max_size - interactive_reserve`
    open ones fails at once (RESOURCE_EXHAUSTED) instead of waiting for the pool."""
    control_pool_size: int = 3
    """Connections of the pool for phase 2, fences and recovery scans, apart from the
    branch pool, so that open branches can never hold up a decided transaction."""
    pool_timeout: float = 10.0
    """Seconds a branch waits for a pooled connection before it fails (NO vote)."""
    lock_timeout: float = 15.0
    """PostgreSQL lock_timeout: a statement waiting this long on a lock fails (NO vote).
    A safety net: cross-shard deadlocks, which PostgreSQL cannot see, are broken by the
    coordinators' deadlock detector in a fraction of a second."""
    statement_timeout: float = 30.0
    """PostgreSQL statement_timeout for branch statements."""
    idle_branch_timeout: float = 30.0
    """An interactive branch idle this long before Prepare is rolled back; a later
    Prepare votes NO."""
    recovery_interval: float = 2.0
    """Seconds between scans for in-doubt prepared branches."""
    recovery_grace: float = 2.0
    """A prepared branch younger than this is left to the live protocol."""
    coordinator_rpc_timeout: float = 3.0
    """Deadline of the GetTransaction calls recovery makes."""
    marker_retention: float = 7 * 24 * 3600.0
    """Seconds committed-branch markers are kept (they make Commit idempotent)."""
    marker_prune_interval: float = 3600.0
    """Seconds between deletions of markers older than the retention."""
    tombstones: int = 100_000
    """Finished branches remembered in memory, so a late Prepare or Execute after an
    Abort is refused instead of opening a new branch."""
    shutdown_grace: float = 2.0
    """Seconds in-flight RPCs get to finish on SIGTERM."""
    allow_failpoints: bool = False
    """Accept the SetFailpoints admin call (a test hook that can crash the daemon)."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """Certificate, key and CA for every channel (the default is plaintext: --insecure)."""
    admins: frozenset[str] = frozenset()
    """Client identities with the admin role (SetFailpoints)."""
    limits: Limits = field(default_factory=Limits)
    """Request limits."""

    @property
    def max_interactive_branches(self) -> int:
        return max(1, self.pool_max_size - self.interactive_reserve)
