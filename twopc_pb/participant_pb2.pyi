from twopc_pb import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vote(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOTE_UNSPECIFIED: _ClassVar[Vote]
    YES: _ClassVar[Vote]
    NO: _ClassVar[Vote]
    READ_ONLY: _ClassVar[Vote]
    COMMITTED_ONE_PHASE: _ClassVar[Vote]

class Phase2Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE2_OUTCOME_UNSPECIFIED: _ClassVar[Phase2Outcome]
    PHASE2_COMMITTED: _ClassVar[Phase2Outcome]
    PHASE2_ALREADY_COMMITTED: _ClassVar[Phase2Outcome]
    PHASE2_ROLLED_BACK: _ClassVar[Phase2Outcome]
    PHASE2_ALREADY_ROLLED_BACK: _ClassVar[Phase2Outcome]
    PHASE2_NOT_PREPARED: _ClassVar[Phase2Outcome]
VOTE_UNSPECIFIED: Vote
YES: Vote
NO: Vote
READ_ONLY: Vote
COMMITTED_ONE_PHASE: Vote
PHASE2_OUTCOME_UNSPECIFIED: Phase2Outcome
PHASE2_COMMITTED: Phase2Outcome
PHASE2_ALREADY_COMMITTED: Phase2Outcome
PHASE2_ROLLED_BACK: Phase2Outcome
PHASE2_ALREADY_ROLLED_BACK: Phase2Outcome
PHASE2_NOT_PREPARED: Phase2Outcome

class BranchRef(_message.Message):
    __slots__ = ("transaction_id",)
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    def __init__(self, transaction_id: _Optional[str] = ...) -> None: ...

class BranchExecuteRequest(_message.Message):
    __slots__ = ("transaction_id", "statements", "incarnation", "isolation")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    statements: _containers.RepeatedCompositeFieldContainer[_types_pb2.Statement]
    incarnation: str
    isolation: _types_pb2.IsolationLevel
    def __init__(self, transaction_id: _Optional[str] = ..., statements: _Optional[_Iterable[_Union[_types_pb2.Statement, _Mapping]]] = ..., incarnation: _Optional[str] = ..., isolation: _Optional[_Union[_types_pb2.IsolationLevel, str]] = ...) -> None: ...

class BranchExecuteResponse(_message.Message):
    __slots__ = ("results", "incarnation")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_types_pb2.StatementResult]
    incarnation: str
    def __init__(self, results: _Optional[_Iterable[_Union[_types_pb2.StatementResult, _Mapping]]] = ..., incarnation: _Optional[str] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("transaction_id", "statements", "one_phase", "incarnation", "isolation")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    ONE_PHASE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    statements: _containers.RepeatedCompositeFieldContainer[_types_pb2.Statement]
    one_phase: bool
    incarnation: str
    isolation: _types_pb2.IsolationLevel
    def __init__(self, transaction_id: _Optional[str] = ..., statements: _Optional[_Iterable[_Union[_types_pb2.Statement, _Mapping]]] = ..., one_phase: _Optional[bool] = ..., incarnation: _Optional[str] = ..., isolation: _Optional[_Union[_types_pb2.IsolationLevel, str]] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("vote", "reason", "sqlstate", "results")
    VOTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SQLSTATE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    vote: Vote
    reason: str
    sqlstate: str
    results: _containers.RepeatedCompositeFieldContainer[_types_pb2.StatementResult]
    def __init__(self, vote: _Optional[_Union[Vote, str]] = ..., reason: _Optional[str] = ..., sqlstate: _Optional[str] = ..., results: _Optional[_Iterable[_Union[_types_pb2.StatementResult, _Mapping]]] = ...) -> None: ...

class PrepareItem(_message.Message):
    __slots__ = ("ref", "request")
    REF_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ref: int
    request: PrepareRequest
    def __init__(self, ref: _Optional[int] = ..., request: _Optional[_Union[PrepareRequest, _Mapping]] = ...) -> None: ...

class PrepareBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PrepareItem]
    def __init__(self, items: _Optional[_Iterable[_Union[PrepareItem, _Mapping]]] = ...) -> None: ...

class VoteItem(_message.Message):
    __slots__ = ("ref", "code", "message", "response")
    REF_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ref: int
    code: int
    message: str
    response: PrepareResponse
    def __init__(self, ref: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[PrepareResponse, _Mapping]] = ...) -> None: ...

class VoteBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[VoteItem]
    def __init__(self, items: _Optional[_Iterable[_Union[VoteItem, _Mapping]]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("outcome", "changed")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    outcome: Phase2Outcome
    changed: bool
    def __init__(self, outcome: _Optional[_Union[Phase2Outcome, str]] = ..., changed: _Optional[bool] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("transaction_id", "commit")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    commit: bool
    def __init__(self, transaction_id: _Optional[str] = ..., commit: _Optional[bool] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("decisions",)
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("code", "message", "changed", "outcome")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    changed: bool
    outcome: Phase2Outcome
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., changed: _Optional[bool] = ..., outcome: _Optional[_Union[Phase2Outcome, str]] = ...) -> None: ...

class FinishResponse(_message.Message):
    __slots__ = ("finished",)
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    finished: _containers.RepeatedCompositeFieldContainer[Finished]
    def __init__(self, finished: _Optional[_Iterable[_Union[Finished, _Mapping]]] = ...) -> None: ...

class FinishItem(_message.Message):
    __slots__ = ("ref", "request")
    REF_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ref: int
    request: FinishRequest
    def __init__(self, ref: _Optional[int] = ..., request: _Optional[_Union[FinishRequest, _Mapping]] = ...) -> None: ...

class FinishBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[FinishItem]
    def __init__(self, items: _Optional[_Iterable[_Union[FinishItem, _Mapping]]] = ...) -> None: ...

class FinishedItem(_message.Message):
    __slots__ = ("ref", "code", "message", "response")
    REF_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ref: int
    code: int
    message: str
    response: FinishResponse
    def __init__(self, ref: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[FinishResponse, _Mapping]] = ...) -> None: ...

class FinishedBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[FinishedItem]
    def __init__(self, items: _Optional[_Iterable[_Union[FinishedItem, _Mapping]]] = ...) -> None: ...

class ListPreparedRequest(_message.Message):
    __slots__ = ("coordinator_id",)
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    def __init__(self, coordinator_id: _Optional[str] = ...) -> None: ...

class PreparedBranch(_message.Message):
    __slots__ = ("transaction_id", "gid", "age_seconds")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    gid: str
    age_seconds: float
    def __init__(self, transaction_id: _Optional[str] = ..., gid: _Optional[str] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class ListPreparedResponse(_message.Message):
    __slots__ = ("branches", "highest_epoch")
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    HIGHEST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    branches: _containers.RepeatedCompositeFieldContainer[PreparedBranch]
    highest_epoch: int
    def __init__(self, branches: _Optional[_Iterable[_Union[PreparedBranch, _Mapping]]] = ..., highest_epoch: _Optional[int] = ...) -> None: ...

class ListHeuristicRequest(_message.Message):
    __slots__ = ("coordinator_id",)
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    def __init__(self, coordinator_id: _Optional[str] = ...) -> None: ...

class HeuristicDecision(_message.Message):
    __slots__ = ("transaction_id", "commit", "reason", "operator", "decided_at", "coordinator_check")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_CHECK_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    commit: bool
    reason: str
    operator: str
    decided_at: float
    coordinator_check: str
    def __init__(self, transaction_id: _Optional[str] = ..., commit: _Optional[bool] = ..., reason: _Optional[str] = ..., operator: _Optional[str] = ..., decided_at: _Optional[float] = ..., coordinator_check: _Optional[str] = ...) -> None: ...

class ListHeuristicResponse(_message.Message):
    __slots__ = ("decisions",)
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[HeuristicDecision]
    def __init__(self, decisions: _Optional[_Iterable[_Union[HeuristicDecision, _Mapping]]] = ...) -> None: ...

class ParticipantStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForeignPrepared(_message.Message):
    __slots__ = ("gid", "age_seconds", "owner", "database", "locks", "why")
    GID_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    gid: str
    age_seconds: float
    owner: str
    database: str
    locks: int
    why: str
    def __init__(self, gid: _Optional[str] = ..., age_seconds: _Optional[float] = ..., owner: _Optional[str] = ..., database: _Optional[str] = ..., locks: _Optional[int] = ..., why: _Optional[str] = ...) -> None: ...

class ParticipantStatus(_message.Message):
    __slots__ = ("participant_id", "open_branches", "prepared_branches", "counters", "incarnation", "foreign_prepared")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    PREPARED_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    FOREIGN_PREPARED_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    open_branches: int
    prepared_branches: int
    counters: _containers.ScalarMap[str, int]
    incarnation: str
    foreign_prepared: _containers.RepeatedCompositeFieldContainer[ForeignPrepared]
    def __init__(self, participant_id: _Optional[str] = ..., open_branches: _Optional[int] = ..., prepared_branches: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., incarnation: _Optional[str] = ..., foreign_prepared: _Optional[_Iterable[_Union[ForeignPrepared, _Mapping]]] = ...) -> None: ...

class WaitsForRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WaitEdge(_message.Message):
    __slots__ = ("waiter_transaction_id", "holder_transaction_id", "holder_prepared", "holder_pid", "wait_started")
    WAITER_TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_PREPARED_FIELD_NUMBER: _ClassVar[int]
    HOLDER_PID_FIELD_NUMBER: _ClassVar[int]
    WAIT_STARTED_FIELD_NUMBER: _ClassVar[int]
    waiter_transaction_id: str
    holder_transaction_id: str
    holder_prepared: bool
    holder_pid: int
    wait_started: float
    def __init__(self, waiter_transaction_id: _Optional[str] = ..., holder_transaction_id: _Optional[str] = ..., holder_prepared: _Optional[bool] = ..., holder_pid: _Optional[int] = ..., wait_started: _Optional[float] = ...) -> None: ...

class WaitsForResponse(_message.Message):
    __slots__ = ("edges",)
    EDGES_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[WaitEdge]
    def __init__(self, edges: _Optional[_Iterable[_Union[WaitEdge, _Mapping]]] = ...) -> None: ...
