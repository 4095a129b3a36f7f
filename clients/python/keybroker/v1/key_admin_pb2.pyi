import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from keybroker.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

class EnableKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class EnableKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: _resources_pb2.Key
    def __init__(self, key: _Optional[_Union[_resources_pb2.Key, _Mapping]] = ...) -> None: ...

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
