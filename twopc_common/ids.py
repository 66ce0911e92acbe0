"""Transaction ids and PostgreSQL gids.

A transaction id is `<coordinator id>.<epoch>.<sequence>`: the coordinator id lets many
coordinators share participants, the epoch (bumped durably at every coordinator start)
makes ids unique forever without logging each one, the sequence counts within an epoch.

A branch's gid is psycopg's XA form of Xid(FORMAT_ID, transaction id, participant id),
so `tpc_recover()` parses it back and the format id tells our branches from anyone
else's prepared transactions in the same database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import Xid

from twopc_common.errors import InvalidArgument

# "2PC1" in ASCII; any fixed 31-bit number would do, it only has to be ours.
FORMAT_ID = 0x32504331

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# psycopg (like XA) caps gtrid at 64 characters: 24 for the coordinator id leaves room
# for two 19-digit numbers and the dots.
_MAX_LENGTH = {"coordinator": 24, "participant": 32}
# What `__str__` produces and nothing else: a coordinator id, then two decimal
# numbers of at most 19 digits (int() alone would also take "+1", " 1" and "1_0").
_TRANSACTION_ID = re.compile(r"^([A-Za-z0-9_-]{1,24})\.([0-9]{1,19})\.([0-9]{1,19})$")
MAX_TRANSACTION_ID_CHARS = 64
"""psycopg's (XA's) cap on a gid's global part, which is the transaction id."""


def check_name(kind: str, name: str) -> str:
    """Validate a coordinator id (1-24 of [A-Za-z0-9_-]) or participant id (1-32)."""
    longest = _MAX_LENGTH.get(kind, 32)
    if not _NAME.match(name) or len(name) > longest:
        raise InvalidArgument(f"{kind} id {name!r} must be 1-{longest} characters of [A-Za-z0-9_-]")
    return name


@dataclass(frozen=True, slots=True)
class TransactionId:
    coordinator: str
    epoch: int
    sequence: int

    def __str__(self) -> str:
        return f"{self.coordinator}.{self.epoch}.{self.sequence}"

    @classmethod
    def parse(cls, text: str) -> TransactionId:
        """Refuses (InvalidArgument) anything a coordinator could not have assigned,
        before it can reach a gid or a database."""
        match = _TRANSACTION_ID.match(text) if len(text) <= MAX_TRANSACTION_ID_CHARS else None
        if match is None:
            shown = text if len(text) <= 80 else f"{text[:80]}..."
            raise InvalidArgument(
                f"malformed transaction id {shown!r}: expected COORDINATOR.EPOCH.SEQUENCE "
                f"(coordinator 1-24 of [A-Za-z0-9_-], at most {MAX_TRANSACTION_ID_CHARS} "
                "characters)"
            )
        return cls(match[1], int(match[2]), int(match[3]))


def branch_xid(transaction_id: str, participant_id: str) -> Xid:
    return Xid.from_parts(FORMAT_ID, transaction_id, participant_id)


def is_ours(xid: Xid) -> bool:
    return xid.format_id == FORMAT_ID and xid.bqual is not None
