from twopc_pb import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    COMMITTED: _ClassVar[Outcome]
    ABORTED: _ClassVar[Outcome]
    IN_PROGRESS: _ClassVar[Outcome]
    UNKNOWN: _ClassVar[Outcome]
    FORGOTTEN: _ClassVar[Outcome]

class AbortCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABORT_CAUSE_UNSPECIFIED: _ClassVar[AbortCause]
    VOTE_NO: _ClassVar[AbortCause]
    PREPARE_TIMEOUT: _ClassVar[AbortCause]
    PARTICIPANT_UNAVAILABLE: _ClassVar[AbortCause]
    CLIENT_ROLLBACK: _ClassVar[AbortCause]
    EXECUTE_FAILED: _ClassVar[AbortCause]
    COORDINATOR_RESTART: _ClassVar[AbortCause]
    TRANSACTION_TIMEOUT: _ClassVar[AbortCause]
    DEADLOCK: _ClassVar[AbortCause]
    SERIALIZATION_FAILURE: _ClassVar[AbortCause]
    LOCK_TIMEOUT: _ClassVar[AbortCause]

class TransactionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[TransactionState]
    ACTIVE: _ClassVar[TransactionState]
    PREPARING: _ClassVar[TransactionState]
    COMMITTING: _ClassVar[TransactionState]
    ABORTING: _ClassVar[TransactionState]
    STATE_COMMITTED: _ClassVar[TransactionState]
    STATE_ABORTED: _ClassVar[TransactionState]
    STATE_UNKNOWN: _ClassVar[TransactionState]
OUTCOME_UNSPECIFIED: Outcome
COMMITTED: Outcome
ABORTED: Outcome
IN_PROGRESS: Outcome
UNKNOWN: Outcome
FORGOTTEN: Outcome
ABORT_CAUSE_UNSPECIFIED: AbortCause
VOTE_NO: AbortCause
PREPARE_TIMEOUT: AbortCause
PARTICIPANT_UNAVAILABLE: AbortCause
CLIENT_ROLLBACK: AbortCause
EXECUTE_FAILED: AbortCause
COORDINATOR_RESTART: AbortCause
TRANSACTION_TIMEOUT: AbortCause
DEADLOCK: AbortCause
SERIALIZATION_FAILURE: AbortCause
LOCK_TIMEOUT: AbortCause
STATE_UNSPECIFIED: TransactionState
ACTIVE: TransactionState
PREPARING: TransactionState
COMMITTING: TransactionState
ABORTING: TransactionState
STATE_COMMITTED: TransactionState
STATE_ABORTED: TransactionState
STATE_UNKNOWN: TransactionState

class Branch(_message.Message):
    __slots__ = ("participant", "statements")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    participant: str
    statements: _containers.RepeatedCompositeFieldContainer[_types_pb2.Statement]
    def __init__(self, participant: _Optional[str] = ..., statements: _Optional[_Iterable[_Union[_types_pb2.Statement, _Mapping]]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("branches", "idempotency_key", "wait_for_completion", "isolation")
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_COMPLETION_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    branches: _containers.RepeatedCompositeFieldContainer[Branch]
    idempotency_key: str
    wait_for_completion: bool
    isolation: _types_pb2.IsolationLevel
    def __init__(self, branches: _Optional[_Iterable[_Union[Branch, _Mapping]]] = ..., idempotency_key: _Optional[str] = ..., wait_for_completion: _Optional[bool] = ..., isolation: _Optional[_Union[_types_pb2.IsolationLevel, str]] = ...) -> None: ...

class RunItem(_message.Message):
    __slots__ = ("ref", "request", "timeout_ms")
    REF_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ref: int
    request: RunRequest
    timeout_ms: int
    def __init__(self, ref: _Optional[int] = ..., request: _Optional[_Union[RunRequest, _Mapping]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class RunBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RunItem]
    def __init__(self, items: _Optional[_Iterable[_Union[RunItem, _Mapping]]] = ...) -> None: ...

class OutcomeItem(_message.Message):
    __slots__ = ("ref", "code", "message", "outcome", "trailers")
    class TrailersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TRAILERS_FIELD_NUMBER: _ClassVar[int]
    ref: int
    code: int
    message: str
    outcome: TransactionOutcome
    trailers: _containers.ScalarMap[str, str]
    def __init__(self, ref: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., outcome: _Optional[_Union[TransactionOutcome, _Mapping]] = ..., trailers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class OutcomeBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[OutcomeItem]
    def __init__(self, items: _Optional[_Iterable[_Union[OutcomeItem, _Mapping]]] = ...) -> None: ...

class TransactionOutcome(_message.Message):
    __slots__ = ("transaction_id", "outcome", "abort_cause", "abort_participant", "abort_reason", "results", "one_phase", "completed")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ABORT_CAUSE_FIELD_NUMBER: _ClassVar[int]
    ABORT_PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ONE_PHASE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    outcome: Outcome
    abort_cause: AbortCause
    abort_participant: str
    abort_reason: str
    results: _containers.RepeatedCompositeFieldContainer[_types_pb2.BranchResults]
    one_phase: bool
    completed: bool
    def __init__(self, transaction_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., abort_cause: _Optional[_Union[AbortCause, str]] = ..., abort_participant: _Optional[str] = ..., abort_reason: _Optional[str] = ..., results: _Optional[_Iterable[_Union[_types_pb2.BranchResults, _Mapping]]] = ..., one_phase: _Optional[bool] = ..., completed: _Optional[bool] = ...) -> None: ...

class BeginRequest(_message.Message):
    __slots__ = ("isolation",)
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    isolation: _types_pb2.IsolationLevel
    def __init__(self, isolation: _Optional[_Union[_types_pb2.IsolationLevel, str]] = ...) -> None: ...

class BeginResponse(_message.Message):
    __slots__ = ("transaction_id",)
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    def __init__(self, transaction_id: _Optional[str] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("transaction_id", "participant", "statements")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    participant: str
    statements: _containers.RepeatedCompositeFieldContainer[_types_pb2.Statement]
    def __init__(self, transaction_id: _Optional[str] = ..., participant: _Optional[str] = ..., statements: _Optional[_Iterable[_Union[_types_pb2.Statement, _Mapping]]] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_types_pb2.StatementResult]
    def __init__(self, results: _Optional[_Iterable[_Union[_types_pb2.StatementResult, _Mapping]]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("transaction_id", "wait_for_completion")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_COMPLETION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    wait_for_completion: bool
    def __init__(self, transaction_id: _Optional[str] = ..., wait_for_completion: _Optional[bool] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("transaction_id",)
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    def __init__(self, transaction_id: _Optional[str] = ...) -> None: ...

class GetTransactionRequest(_message.Message):
    __slots__ = ("transaction_id",)
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    def __init__(self, transaction_id: _Optional[str] = ...) -> None: ...

class TransactionStatus(_message.Message):
    __slots__ = ("transaction_id", "outcome", "state", "participants", "age_seconds", "pending_acks")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_ACKS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    outcome: Outcome
    state: TransactionState
    participants: _containers.RepeatedScalarFieldContainer[str]
    age_seconds: float
    pending_acks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, transaction_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., state: _Optional[_Union[TransactionState, str]] = ..., participants: _Optional[_Iterable[str]] = ..., age_seconds: _Optional[float] = ..., pending_acks: _Optional[_Iterable[str]] = ...) -> None: ...

class ListTransactionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTransactionsResponse(_message.Message):
    __slots__ = ("transactions",)
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    transactions: _containers.RepeatedCompositeFieldContainer[TransactionStatus]
    def __init__(self, transactions: _Optional[_Iterable[_Union[TransactionStatus, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CoordinatorStatus(_message.Message):
    __slots__ = ("coordinator_id", "epoch", "recovered", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    epoch: int
    recovered: bool
    counters: _containers.ScalarMap[str, int]
    def __init__(self, coordinator_id: _Optional[str] = ..., epoch: _Optional[int] = ..., recovered: _Optional[bool] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...
