from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateDataKeyRequest(_message.Message):
    __slots__ = ("key_id", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    context: _containers.ScalarMap[str, str]
    def __init__(self, key_id: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GenerateDataKeyResponse(_message.Message):
    __slots__ = ("plaintext_key", "wrapped_key", "key_id", "key_version")
    PLAINTEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    plaintext_key: bytes
    wrapped_key: bytes
    key_id: str
    key_version: int
    def __init__(self, plaintext_key: _Optional[bytes] = ..., wrapped_key: _Optional[bytes] = ..., key_id: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...

class EncryptRequest(_message.Message):
    __slots__ = ("key_id", "plaintext", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    plaintext: bytes
    context: _containers.ScalarMap[str, str]
    def __init__(self, key_id: _Optional[str] = ..., plaintext: _Optional[bytes] = ..., context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EncryptResponse(_message.Message):
    __slots__ = ("ciphertext", "key_id", "key_version")
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    key_id: str
    key_version: int
    def __init__(self, ciphertext: _Optional[bytes] = ..., key_id: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...

class DecryptRequest(_message.Message):
    __slots__ = ("ciphertext", "context", "token")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    context: _containers.ScalarMap[str, str]
    token: str
    def __init__(self, ciphertext: _Optional[bytes] = ..., context: _Optional[_Mapping[str, str]] = ..., token: _Optional[str] = ...) -> None: ...

class DecryptResponse(_message.Message):
    __slots__ = ("plaintext", "key_id", "key_version")
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    plaintext: bytes
    key_id: str
    key_version: int
    def __init__(self, plaintext: _Optional[bytes] = ..., key_id: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...

class ReWrapRequest(_message.Message):
    __slots__ = ("ciphertext", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    context: _containers.ScalarMap[str, str]
    def __init__(self, ciphertext: _Optional[bytes] = ..., context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReWrapResponse(_message.Message):
    __slots__ = ("ciphertext", "key_id", "key_version")
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    key_id: str
    key_version: int
    def __init__(self, ciphertext: _Optional[bytes] = ..., key_id: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...
