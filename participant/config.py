"""The participant agent's configuration: every timeout and limit, named and documented."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twopc_common import settings
from twopc_common.errors import InvalidArgument
from twopc_common.limits import Limits
from twopc_common.statements import DEFAULT_ALLOWED, StatementKind
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
    coordinators: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Coordinator id -> the HOST:PORTs of its processes (the active one and its
    standbys, in the order to try), asked for the outcome of in-doubt branches."""
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
    in_doubt_warning_interval: float = 60.0
    """Seconds between repeated warnings about the same in-doubt branch (it is looked
    at every recovery interval, but said once per this interval)."""
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
    metrics_listen: str | None = None
    """HOST:PORT of the Prometheus `/metrics` endpoint; None: no endpoint."""
    health_interval: float = 1.0
    """Seconds between the health probes behind the gRPC health service."""
    health_timeout: float = 2.0
    """A health probe not answered within this many seconds means NOT_SERVING."""
    allow_failpoints: bool = False
    """Accept the SetFailpoints admin call (a test hook that can crash the daemon)."""
    branch_role: str = ""
    """PostgreSQL role branch statements run as (SET LOCAL ROLE); it must not be a
    superuser nor have any privilege on the agent's schema (checked at start). Empty:
    branch statements run as the agent's own role."""
    statement_kinds: frozenset[StatementKind] = DEFAULT_ALLOWED
    """Kinds of statement a branch may run (`twopc_common.statements`); the default
    widened and narrowed by --allow-statement / --refuse-statement."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """Certificate, key and CA for every channel (the default is plaintext: --insecure)."""
    tls_reload_interval: float = 5.0
    """Seconds between checks of the TLS files for the outbound channels (at the next
    call; SIGHUP checks at once). The server itself checks them at every handshake."""
    admins: frozenset[str] = frozenset()
    """Client identities with the admin role (SetFailpoints)."""
    limits: Limits = field(default_factory=Limits)
    """Request limits."""

    @property
    def max_interactive_branches(self) -> int:
        return max(1, self.pool_max_size - self.interactive_reserve)

    def __post_init__(self) -> None:
        # The id is checked where it is parsed (check_name); the rest would otherwise
        # surface as a traceback from psycopg or grpc, or not at all (a nan timeout).
        settings.dsn("dsn", self.dsn)
        settings.host_port("listen", self.listen)
        for name, addresses in self.coordinators.items():
            if not addresses:
                raise InvalidArgument(f"coordinator {name}: give at least one HOST:PORT")
            for address in addresses:
                settings.host_port(f"coordinator {name}", address)
        settings.count("pool_min_size", self.pool_min_size)
        settings.count("pool_max_size", self.pool_max_size)
        if self.pool_min_size > self.pool_max_size:
            raise InvalidArgument(
                f"pool_min_size ({self.pool_min_size}) is larger than pool_max_size "
                f"({self.pool_max_size}): lower --pool-min-size or raise --pool-max-size"
            )
        settings.durations(
            self,
            "pool_timeout",
            "lock_timeout",
            "statement_timeout",
            "idle_branch_timeout",
            "recovery_interval",
            "coordinator_rpc_timeout",
            "in_doubt_warning_interval",
            "marker_retention",
            "marker_prune_interval",
            "tls_reload_interval",
            "health_interval",
            "health_timeout",
        )
        settings.seconds("recovery_grace", self.recovery_grace, zero_ok=True)
        settings.seconds("shutdown_grace", self.shutdown_grace, zero_ok=True)
        settings.count("tombstones", self.tombstones)
        settings.count("control_pool_size", self.control_pool_size)
        settings.count("interactive_reserve", self.interactive_reserve, least=0)
