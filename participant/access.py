"""Who may call what on a participant agent.

Execute, Prepare, PrepareStream, Commit, Abort, Finish, FinishStream, ListPrepared and
WaitsFor (the deadlock detector's lock graph, which names transactions) come only from
the agent's configured coordinators (`--coordinator NAME=HOST:PORT`: the caller's certificate must
name `twopc://coordinator/NAME`); anyone else gets PERMISSION_DENIED before the agent
does anything. Configured coordinators trust each other: one is not held to the
transaction ids that carry its own name. Status: anyone authenticated.
SetFailpoints: admins (and the daemon must run with --allow-failpoints).
ListHeuristic (which branches an operator resolved by hand): configured coordinators
(their phase 2 stops retrying such a branch, `inspect` runs with the coordinator's
certificate) and admins (`twopc-participant resolve` operators).

The standard health service and server reflection are not behind these rules: they
name no transaction and change nothing, so any peer that passed the mutual-TLS
handshake (a certificate from the CA) may call them, as `grpc_health_probe
-tls-client-cert` and the coordinator's and harness's probes do.
"""

from __future__ import annotations

from participant.config import ParticipantConfig
from twopc_common.auth import Principal, Rule


def rules(config: ParticipantConfig) -> dict[str, Rule]:
    def coordinator(p: Principal) -> bool:
        return p.is_("coordinator", config.coordinators)

    return {
        "Execute": coordinator,
        "Prepare": coordinator,
        "PrepareStream": coordinator,
        "Commit": coordinator,
        "Abort": coordinator,
        "Finish": coordinator,
        "FinishStream": coordinator,
        "ListPrepared": coordinator,
        "WaitsFor": coordinator,
        "ListHeuristic": lambda p: coordinator(p) or p.admin,
        "Status": lambda p: True,
        "SetFailpoints": lambda p: p.admin,
    }
