from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Target(_message.Message):
    __slots__ = ("provided", "echo", "model_id")
    PROVIDED_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    provided: ProvidedTarget
    echo: EchoTarget
    model_id: str
    def __init__(self, provided: _Optional[_Union[ProvidedTarget, _Mapping]] = ..., echo: _Optional[_Union[EchoTarget, _Mapping]] = ..., model_id: _Optional[str] = ...) -> None: ...

class ProvidedTarget(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EchoTarget(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
