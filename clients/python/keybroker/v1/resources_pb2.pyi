import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    KEY_STATE_ENABLED: _ClassVar[KeyState]
    KEY_STATE_DISABLED: _ClassVar[KeyState]
    KEY_STATE_PENDING_DESTRUCTION: _ClassVar[KeyState]
    KEY_STATE_DESTROYED: _ClassVar[KeyState]

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    OPERATION_ENCRYPT: _ClassVar[Operation]
    OPERATION_DECRYPT: _ClassVar[Operation]
    OPERATION_REWRAP: _ClassVar[Operation]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_ALLOWED: _ClassVar[Outcome]
    OUTCOME_DENIED: _ClassVar[Outcome]
    OUTCOME_ERROR: _ClassVar[Outcome]
KEY_STATE_UNSPECIFIED: KeyState
KEY_STATE_ENABLED: KeyState
KEY_STATE_DISABLED: KeyState
KEY_STATE_PENDING_DESTRUCTION: KeyState
KEY_STATE_DESTROYED: KeyState
OPERATION_UNSPECIFIED: Operation
OPERATION_ENCRYPT: Operation
OPERATION_DECRYPT: Operation
OPERATION_REWRAP: Operation
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_ALLOWED: Outcome
OUTCOME_DENIED: Outcome
OUTCOME_ERROR: Outcome

class KeyVersion(_message.Message):
    __slots__ = ("version", "create_time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    version: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Grant(_message.Message):
    __slots__ = ("principal", "operations", "context", "max_token_ttl", "countries")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_TTL_FIELD_NUMBER: _ClassVar[int]
    COUNTRIES_FIELD_NUMBER: _ClassVar[int]
    principal: str
    operations: _containers.RepeatedScalarFieldContainer[Operation]
    context: _containers.ScalarMap[str, str]
    max_token_ttl: _duration_pb2.Duration
    countries: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, principal: _Optional[str] = ..., operations: _Optional[_Iterable[_Union[Operation, str]]] = ..., context: _Optional[_Mapping[str, str]] = ..., max_token_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., countries: _Optional[_Iterable[str]] = ...) -> None: ...

class KeyPolicy(_message.Message):
    __slots__ = ("grants", "allowed_jurisdictions")
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_JURISDICTIONS_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    allowed_jurisdictions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., allowed_jurisdictions: _Optional[_Iterable[str]] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("key_id", "description", "state", "primary_version", "versions", "min_decryption_version", "policy", "hsm", "create_time", "rotation_period", "next_rotation_time", "destroy_time", "hsm_info")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_DECRYPTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    HSM_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROTATION_TIME_FIELD_NUMBER: _ClassVar[int]
    DESTROY_TIME_FIELD_NUMBER: _ClassVar[int]
    HSM_INFO_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    description: str
    state: KeyState
    primary_version: int
    versions: _containers.RepeatedCompositeFieldContainer[KeyVersion]
    min_decryption_version: int
    policy: KeyPolicy
    hsm: str
    create_time: _timestamp_pb2.Timestamp
    rotation_period: _duration_pb2.Duration
    next_rotation_time: _timestamp_pb2.Timestamp
    destroy_time: _timestamp_pb2.Timestamp
    hsm_info: HsmInfo
    def __init__(self, key_id: _Optional[str] = ..., description: _Optional[str] = ..., state: _Optional[_Union[KeyState, str]] = ..., primary_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[KeyVersion, _Mapping]]] = ..., min_decryption_version: _Optional[int] = ..., policy: _Optional[_Union[KeyPolicy, _Mapping]] = ..., hsm: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rotation_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., next_rotation_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., destroy_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hsm_info: _Optional[_Union[HsmInfo, _Mapping]] = ...) -> None: ...

class HsmInfo(_message.Message):
    __slots__ = ("name", "jurisdiction", "operator")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JURISDICTION_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    jurisdiction: str
    operator: str
    def __init__(self, name: _Optional[str] = ..., jurisdiction: _Optional[str] = ..., operator: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("sequence", "time", "principal", "operation", "key_id", "key_version", "token_id", "context", "justification", "outcome", "reason", "request_id", "prev_hash", "hash", "chain", "chain_sequence")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    JUSTIFICATION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    CHAIN_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    principal: str
    operation: str
    key_id: str
    key_version: int
    token_id: str
    context: _containers.ScalarMap[str, str]
    justification: str
    outcome: Outcome
    reason: str
    request_id: str
    prev_hash: str
    hash: str
    chain: str
    chain_sequence: int
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., operation: _Optional[str] = ..., key_id: _Optional[str] = ..., key_version: _Optional[int] = ..., token_id: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., justification: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ..., chain: _Optional[str] = ..., chain_sequence: _Optional[int] = ...) -> None: ...
