import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from keybroker.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApprovalState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_STATE_UNSPECIFIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_PENDING: _ClassVar[ApprovalState]
    APPROVAL_STATE_APPLIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_FAILED: _ClassVar[ApprovalState]
    APPROVAL_STATE_EXPIRED: _ClassVar[ApprovalState]
    APPROVAL_STATE_CANCELLED: _ClassVar[ApprovalState]

class ApprovalOperation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_OPERATION_UNSPECIFIED: _ClassVar[ApprovalOperation]
    APPROVAL_OPERATION_UPDATE_KEY_POLICY: _ClassVar[ApprovalOperation]
    APPROVAL_OPERATION_ENABLE_KEY: _ClassVar[ApprovalOperation]
    APPROVAL_OPERATION_SCHEDULE_KEY_DESTRUCTION: _ClassVar[ApprovalOperation]
APPROVAL_STATE_UNSPECIFIED: ApprovalState
APPROVAL_STATE_PENDING: ApprovalState
APPROVAL_STATE_APPLIED: ApprovalState
APPROVAL_STATE_FAILED: ApprovalState
APPROVAL_STATE_EXPIRED: ApprovalState
APPROVAL_STATE_CANCELLED: ApprovalState
APPROVAL_OPERATION_UNSPECIFIED: ApprovalOperation
APPROVAL_OPERATION_UPDATE_KEY_POLICY: ApprovalOperation
APPROVAL_OPERATION_ENABLE_KEY: ApprovalOperation
APPROVAL_OPERATION_SCHEDULE_KEY_DESTRUCTION: ApprovalOperation

class CreateKeyRequest(_message.Message):
    __slots__ = ("key_id", "description", "policy", "rotation_period", "hsm")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_FIELD_NUMBER: _ClassVar[int]
    HSM_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    description: str
    policy: _resources_pb2.KeyPolicy
    rotation_period: _duration_pb2.Duration
    hsm: str
    def __init__(self, key_id: _Optional[str] = ..., description: _Optional[str] = ..., policy: _Optional[_Union[_resources_pb2.KeyPolicy, _Mapping]] = ..., rotation_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., hsm: _Optional[str] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Key]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[_resources_pb2.Key, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

class UpdateKeyPolicyRequest(_message.Message):
    __slots__ = ("key_id", "policy")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    policy: _resources_pb2.KeyPolicy
    def __init__(self, key_id: _Optional[str] = ..., policy: _Optional[_Union[_resources_pb2.KeyPolicy, _Mapping]] = ...) -> None: ...

class UpdateKeyPolicyResponse(_message.Message):
    __slots__ = ("key", "approval_request")
    KEY_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    approval_request: ApprovalRequest
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ..., approval_request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class EnableKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class EnableKeyResponse(_message.Message):
    __slots__ = ("key", "approval_request")
    KEY_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    approval_request: ApprovalRequest
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ..., approval_request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class DisableKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class DisableKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

class ScheduleKeyDestructionRequest(_message.Message):
    __slots__ = ("key_id", "pending_window")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    pending_window: _duration_pb2.Duration
    def __init__(self, key_id: _Optional[str] = ..., pending_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ScheduleKeyDestructionResponse(_message.Message):
    __slots__ = ("key", "approval_request")
    KEY_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    approval_request: ApprovalRequest
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ..., approval_request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class CancelKeyDestructionRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class CancelKeyDestructionResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

class SetMinDecryptionVersionRequest(_message.Message):
    __slots__ = ("key_id", "min_decryption_version")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_DECRYPTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    min_decryption_version: int
    def __init__(self, key_id: _Optional[str] = ..., min_decryption_version: _Optional[int] = ...) -> None: ...

class SetMinDecryptionVersionResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

class GetKeyUsageRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class KeyVersionUsage(_message.Message):
    __slots__ = ("version", "data_keys_issued", "encryptions", "rewrapped", "decrypts", "decrypts_refused", "last_decrypt_time", "last_use_time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_KEYS_ISSUED_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTIONS_FIELD_NUMBER: _ClassVar[int]
    REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    DECRYPTS_FIELD_NUMBER: _ClassVar[int]
    DECRYPTS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    LAST_DECRYPT_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_USE_TIME_FIELD_NUMBER: _ClassVar[int]
    version: int
    data_keys_issued: int
    encryptions: int
    rewrapped: int
    decrypts: int
    decrypts_refused: int
    last_decrypt_time: _timestamp_pb2.Timestamp
    last_use_time: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., data_keys_issued: _Optional[int] = ..., encryptions: _Optional[int] = ..., rewrapped: _Optional[int] = ..., decrypts: _Optional[int] = ..., decrypts_refused: _Optional[int] = ..., last_decrypt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_use_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetKeyUsageResponse(_message.Message):
    __slots__ = ("key", "versions", "events_counted")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_COUNTED_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    versions: _containers.RepeatedCompositeFieldContainer[KeyVersionUsage]
    events_counted: int
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[KeyVersionUsage, _Mapping]]] = ..., events_counted: _Optional[int] = ...) -> None: ...

class GetDestructionReceiptRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetDestructionReceiptResponse(_message.Message):
    __slots__ = ("key", "receipt_json")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_JSON_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    receipt_json: str
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ..., receipt_json: _Optional[str] = ...) -> None: ...

class ApproveRequestRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ApproveRequestResponse(_message.Message):
    __slots__ = ("approval_request", "key")
    APPROVAL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    approval_request: ApprovalRequest
    key: _resources_pb2.Key
    def __init__(self, approval_request: _Optional[_Union[ApprovalRequest, _Mapping]] = ..., key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

class GetApprovalRequestRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class GetApprovalRequestResponse(_message.Message):
    __slots__ = ("approval_request",)
    APPROVAL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    approval_request: ApprovalRequest
    def __init__(self, approval_request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class ListApprovalRequestsRequest(_message.Message):
    __slots__ = ("state", "key_id", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: ApprovalState
    key_id: str
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[ApprovalState, str]] = ..., key_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApprovalRequestsResponse(_message.Message):
    __slots__ = ("approval_requests", "next_page_token")
    APPROVAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    approval_requests: _containers.RepeatedCompositeFieldContainer[ApprovalRequest]
    next_page_token: str
    def __init__(self, approval_requests: _Optional[_Iterable[_Union[ApprovalRequest, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelApprovalRequestRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelApprovalRequestResponse(_message.Message):
    __slots__ = ("approval_request",)
    APPROVAL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    approval_request: ApprovalRequest
    def __init__(self, approval_request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("principal", "approve_time")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    APPROVE_TIME_FIELD_NUMBER: _ClassVar[int]
    principal: str
    approve_time: _timestamp_pb2.Timestamp
    def __init__(self, principal: _Optional[str] = ..., approve_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ApprovalRequest(_message.Message):
    __slots__ = ("request_id", "operation", "key_id", "requester", "create_time", "expire_time", "state", "required_approvals", "approvals", "policy", "pending_window", "widening", "widening_summary", "reason", "close_time", "closed_by")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_APPROVALS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PENDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    WIDENING_FIELD_NUMBER: _ClassVar[int]
    WIDENING_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CLOSE_TIME_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    operation: ApprovalOperation
    key_id: str
    requester: str
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    state: ApprovalState
    required_approvals: int
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    policy: _resources_pb2.KeyPolicy
    pending_window: _duration_pb2.Duration
    widening: bool
    widening_summary: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    close_time: _timestamp_pb2.Timestamp
    closed_by: str
    def __init__(self, request_id: _Optional[str] = ..., operation: _Optional[_Union[ApprovalOperation, str]] = ..., key_id: _Optional[str] = ..., requester: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[ApprovalState, str]] = ..., required_approvals: _Optional[int] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., policy: _Optional[_Union[_resources_pb2.KeyPolicy, _Mapping]] = ..., pending_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., widening: _Optional[bool] = ..., widening_summary: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., close_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., closed_by: _Optional[str] = ...) -> None: ...
