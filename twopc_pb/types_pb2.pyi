from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IsolationLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ISOLATION_LEVEL_UNSPECIFIED: _ClassVar[IsolationLevel]
    READ_COMMITTED: _ClassVar[IsolationLevel]
    REPEATABLE_READ: _ClassVar[IsolationLevel]
    SERIALIZABLE: _ClassVar[IsolationLevel]
ISOLATION_LEVEL_UNSPECIFIED: IsolationLevel
READ_COMMITTED: IsolationLevel
REPEATABLE_READ: IsolationLevel
SERIALIZABLE: IsolationLevel

class Value(_message.Message):
    __slots__ = ("is_null", "bool_value", "int_value", "float_value", "text_value", "bytes_value", "decimal_value", "other_value")
    IS_NULL_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    TEXT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    OTHER_VALUE_FIELD_NUMBER: _ClassVar[int]
    is_null: bool
    bool_value: bool
    int_value: int
    float_value: float
    text_value: str
    bytes_value: bytes
    decimal_value: str
    other_value: str
    def __init__(self, is_null: _Optional[bool] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., text_value: _Optional[str] = ..., bytes_value: _Optional[bytes] = ..., decimal_value: _Optional[str] = ..., other_value: _Optional[str] = ...) -> None: ...

class Expectation(_message.Message):
    __slots__ = ("exactly", "at_least", "at_most")
    EXACTLY_FIELD_NUMBER: _ClassVar[int]
    AT_LEAST_FIELD_NUMBER: _ClassVar[int]
    AT_MOST_FIELD_NUMBER: _ClassVar[int]
    exactly: int
    at_least: int
    at_most: int
    def __init__(self, exactly: _Optional[int] = ..., at_least: _Optional[int] = ..., at_most: _Optional[int] = ...) -> None: ...

class Statement(_message.Message):
    __slots__ = ("sql", "params", "expect")
    SQL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    EXPECT_FIELD_NUMBER: _ClassVar[int]
    sql: str
    params: _containers.RepeatedCompositeFieldContainer[Value]
    expect: Expectation
    def __init__(self, sql: _Optional[str] = ..., params: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., expect: _Optional[_Union[Expectation, _Mapping]] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class StatementResult(_message.Message):
    __slots__ = ("rows_affected", "columns", "rows")
    ROWS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows_affected: int
    columns: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    def __init__(self, rows_affected: _Optional[int] = ..., columns: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ...) -> None: ...

class BranchResults(_message.Message):
    __slots__ = ("participant", "results")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    participant: str
    results: _containers.RepeatedCompositeFieldContainer[StatementResult]
    def __init__(self, participant: _Optional[str] = ..., results: _Optional[_Iterable[_Union[StatementResult, _Mapping]]] = ...) -> None: ...

class FailpointsRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: str
    def __init__(self, spec: _Optional[str] = ...) -> None: ...

class FailpointsResponse(_message.Message):
    __slots__ = ("active",)
    class ActiveEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    active: _containers.ScalarMap[str, str]
    def __init__(self, active: _Optional[_Mapping[str, str]] = ...) -> None: ...
