"""The coordinator's configuration: every timeout, limit and retry policy, named.

`CoordinatorConfig` is one flat dataclass (`config.prepare_timeout`), assembled from
a few groups of related fields, each checking its own in `__post_init__`. The groups
carry no `slots`: several slotted bases cannot be combined; the assembled class has
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coordinator.lease import LeaseSettings
from coordinator.protocol import RetryPolicy
from twopc_common import settings
from twopc_common.errors import InvalidArgument
from twopc_common.limits import Limits
from twopc_common.statements import DEFAULT_ALLOWED, StatementKind
from twopc_common.tls import TlsConfig


@dataclass(frozen=True)
class Placement:
    """Who this coordinator is, where it listens, its decision log, its participants."""

    id: str
    """This coordinator's name; it is part of every transaction id it assigns."""
    log_path: str
    """Path of the SQLite decision log, or the `postgresql://` URL (without a password)
    of a PostgreSQL one (`coordinator.pg_log`); "" when the URL is in `log_dsn_file`."""
    log_dsn_file: Path | None = None
    """A file holding the PostgreSQL decision log's connection string (it may carry a
    password, which the command line must not)."""
    advertise: str | None = None
    """HOST:PORT clients are sent to when this process is the active one (a standby
    names it in its answers); default: `listen`."""
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    """The active process's lease on a PostgreSQL decision log (`coordinator.lease`)."""
    log_reconnect_timeout: float = 30.0
    """How long the PostgreSQL decision log tries to reconnect (the log database
    restarting, its standby being promoted) before it fails stop."""
    listen: str = "127.0.0.1:7000"
    """HOST:PORT the gRPC server binds."""
    participants: dict[str, str] = field(default_factory=dict)
    """Participant name -> HOST:PORT of its agent."""
    retention: float = 7 * 24 * 3600.0
    """Seconds completed transactions (and their idempotency keys) stay in the log."""
    log_batch_max: int = 512
    """Most decision-log records written under one fsync (group commit)."""

    def __post_init__(self) -> None:
        # The id is checked where it is parsed (check_name); these would otherwise be
        # found only when the first transaction needs them.
        settings.host_port("listen", self.listen)
        if self.advertise is not None:
            settings.host_port("advertise", self.advertise)
        for name, address in self.participants.items():
            settings.host_port(f"participant {name}", address)
        settings.durations(self, "log_reconnect_timeout", "retention")
        settings.count("log_batch_max", self.log_batch_max)


@dataclass(frozen=True)
class ProtocolTimeouts:
    """How long the protocol waits, and how it retries, at each step."""

    prepare_timeout: float = 5.0
    """Seconds to collect every vote; a vote missing after it means ABORT."""
    rpc_timeout: float = 3.0
    """Deadline of every other call to a participant (Execute, Commit, Abort, ...)."""
    phase2_backoff_initial: float = 0.05
    """First delay before a failed Commit/Abort is retried."""
    phase2_backoff_max: float = 5.0
    """Cap of the exponential backoff; phase 2 is retried forever, never given up."""
    abort_attempts: int = 3
    """Attempts to deliver an Abort before leaving the branch to recovery (presumed
    abort: the participant's own recovery and the in-doubt scan roll it back)."""
    transaction_idle_timeout: float = 60.0
    """An interactive transaction without calls for this long is rolled back."""
    transaction_max_lifetime: float = 600.0
    """An interactive transaction older than this is rolled back, busy or not: an
    Execute now and then must not hold row locks and the VACUUM horizon forever."""
    recovery_interval: float = 5.0
    """Seconds between scans of the participants for in-doubt branches."""
    startup_recovery_timeout: float = 5.0
    """How long start-up waits for participants to list their in-doubt branches before
    serving anyway (unreachable ones are resolved by the periodic scan)."""
    deadlock_interval: float = 0.05
    """Seconds between looks for cross-shard deadlocks, taken only while some
    transaction has been at work (preparing, or in an Execute) for longer than this;
    a cycle is broken within about two periods. 0 turns it off."""
    deadlock_retries: int = 3
    """Times a one-shot transaction (Run) chosen as a deadlock victim is run again as
    a new transaction before its client is told DEADLOCK: all its work is known."""

    @property
    def phase2_retry(self) -> RetryPolicy:
        return RetryPolicy(self.phase2_backoff_initial, self.phase2_backoff_max)

    def __post_init__(self) -> None:
        settings.durations(
            self,
            "prepare_timeout",
            "rpc_timeout",
            "phase2_backoff_initial",
            "phase2_backoff_max",
            "transaction_idle_timeout",
            "transaction_max_lifetime",
            "recovery_interval",
            "startup_recovery_timeout",
        )
        settings.seconds("deadlock_interval", self.deadlock_interval, zero_ok=True)
        settings.count("abort_attempts", self.abort_attempts)
        settings.count("deadlock_retries", self.deadlock_retries, least=0)
        if self.phase2_backoff_initial > self.phase2_backoff_max:
            raise settings.InvalidSetting(
                "phase2_backoff_max",
                f"({self.phase2_backoff_max}s) is below phase2_backoff_initial "
                f"({self.phase2_backoff_initial}s), the first delay it caps",
            )


@dataclass(frozen=True)
class Load:
    """How much work is let in, and how much finished work is remembered."""

    max_in_flight: int = 256
    """Transactions in flight at once (Runs and Commits between their start and their
    answer). Beyond it a new one waits its turn, before any of its work is done, so
    that overload sheds work before doing it rather than after, when the prepare
    timeout would throw it away."""
    admission_queue: int = 1024
    """Transactions that may wait for a turn beyond --max-in-flight (each holds its
    request in memory). Beyond it a new one gets RESOURCE_EXHAUSTED at once with a
    retry hint (trailing metadata retry-after-ms); 0 refuses at once at the limit."""
    admission_wait: float = 4.0
    """Seconds a transaction waits for a turn before it is refused with the retry hint;
    keep it below the clients' deadlines (the client library's default is 30 s)."""
    prepare_calls: str = "stream"
    """stream: every Prepare to an agent over one long-lived PrepareStream call, several
    in one message when they queue behind a write; unary: one Prepare call each."""
    finish_calls: str = "stream"
    """stream: phase-2 decisions to an agent over one long-lived FinishStream call (a
    batch of decisions per message); unary: a Finish call per batch."""
    recent_outcomes: int = 10_000
    """Finished transactions whose outcome a late Commit or Rollback still gets."""
    owners_remembered: int = 20_000
    """Finished transactions whose owning client is remembered in memory (about 200
    bytes each; twice `recent_outcomes`, whose answers need it). Beyond them (and after
    a restart) the owner comes from the transaction's log record; one without a record
    is then NOT_FOUND to every client but an admin."""
    limits: Limits = field(default_factory=Limits)
    """Request limits."""

    def __post_init__(self) -> None:
        settings.count("recent_outcomes", self.recent_outcomes)
        settings.count("max_in_flight", self.max_in_flight)
        settings.count("admission_queue", self.admission_queue, least=0)
        settings.seconds("admission_wait", self.admission_wait)
        settings.count("owners_remembered", self.owners_remembered)
        for name in ("prepare_calls", "finish_calls"):
            if (value := getattr(self, name)) not in ("stream", "unary"):
                raise settings.InvalidSetting(name, f"must be stream or unary, not {value!r}")


@dataclass(frozen=True)
class Watching:
    """Probes of the participants, this daemon's own health, metrics and shutdown."""

    probe_interval: float = 0.5
    """Seconds between health probes of each participant."""
    probe_timeout: float = 1.0
    """A probe not answered within this fails."""
    probe_failures: int = 2
    """Consecutive failed probes that mark a participant down: new transactions that
    touch it then abort at once (PARTICIPANT_UNAVAILABLE) until a probe succeeds."""
    connect_probe_timeout: float = 1.0
    """When a participant cannot be reached, seconds a plain TCP connect to its address
    may take to find out why (connection refused, timed out, ...) for the abort reason
    and the log."""
    shutdown_grace: float = 2.0
    """Seconds in-flight RPCs get to finish on SIGTERM."""
    metrics_listen: str | None = None
    """HOST:PORT of the Prometheus `/metrics` endpoint; None: no endpoint."""
    health_interval: float = 1.0
    """Seconds between the health probes behind the gRPC health service."""
    health_timeout: float = 2.0
    """A health probe not answered within this many seconds means NOT_SERVING."""

    def __post_init__(self) -> None:
        settings.durations(
            self,
            "probe_interval",
            "probe_timeout",
            "connect_probe_timeout",
            "health_interval",
            "health_timeout",
        )
        settings.seconds("shutdown_grace", self.shutdown_grace, zero_ok=True)
        settings.count("probe_failures", self.probe_failures)


@dataclass(frozen=True)
class Security:
    """Who may connect, over what, and what they may do."""

    allow_failpoints: bool = False
    """Accept the SetFailpoints admin call (a test hook that can crash the daemon)."""
    statement_kinds: frozenset[StatementKind] = DEFAULT_ALLOWED
    """Kinds of statement a branch may run (`twopc_common.statements`); the default
    widened and narrowed by --allow-statement / --refuse-statement."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """Certificate, key and CA for every channel (the default is plaintext: --insecure)."""
    tls_reload_interval: float = 5.0
    """Seconds between checks of the TLS files for the outbound channels (at the next
    call; SIGHUP checks at once). The server itself checks them at every handshake."""
    token_listen: str | None = None
    """HOST:PORT of a second port with server-only TLS for clients with bearer tokens."""
    tokens_file: Path | None = None
    """Hashed bearer tokens (`NAME sha256:HEX [admin]` per line), re-read on change."""
    admins: frozenset[str] = frozenset()
    """Client identities with the admin role (all transactions, SetFailpoints)."""
    client_participants: dict[str, frozenset[str]] = field(default_factory=dict)
    """Client identity -> the participants its transactions may touch
    (--client-participants); an identity not named here, or an admin, may touch all."""

    def __post_init__(self) -> None:
        settings.seconds("tls_reload_interval", self.tls_reload_interval)


@dataclass(frozen=True, slots=True)
class CoordinatorConfig(Security, Watching, Load, ProtocolTimeouts, Placement):
    """Every group's fields, flat; `Placement`'s come first (it has the two without
    defaults: a dataclass orders its bases' fields from the last base to the first)."""

    def __post_init__(self) -> None:
        # A dataclass calls only the most derived __post_init__: each group's, in turn.
        Placement.__post_init__(self)
        ProtocolTimeouts.__post_init__(self)
        Load.__post_init__(self)
        Watching.__post_init__(self)
        Security.__post_init__(self)
        for client, allowed in self.client_participants.items():
            if unknown := sorted(allowed - set(self.participants)):
                raise InvalidArgument(
                    f"--client-participants {client}: {', '.join(unknown)} not configured "
                    "(--participant NAME=HOST:PORT)"
                )
