"""Who may call what on a participant agent.

Execute, Prepare, Commit, Abort, Finish, ListPrepared and WaitsFor (the deadlock
detector's lock graph, which names transactions) come only from the agent's
configured coordinators (`--coordinator NAME=HOST:PORT`: the caller's certificate must
name `twopc://coordinator/NAME`); anyone else gets PERMISSION_DENIED before the agent
does anything. Configured coordinators trust each other: one is not held to the
transaction ids that carry its own name. Status: anyone authenticated.
SetFailpoints: admins (and the daemon must run with --allow-failpoints).
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
        "Commit": coordinator,
        "Abort": coordinator,
        "Finish": coordinator,
        "ListPrepared": coordinator,
        "WaitsFor": coordinator,
        "Status": lambda p: True,
        "SetFailpoints": lambda p: p.admin,
    }
