from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("name", "arguments")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    arguments: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., arguments: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("content", "tool_calls", "cost_usd", "latency_ms", "refused", "prompt_tokens", "completion_tokens", "memory_mib", "image_urls")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URLS_FIELD_NUMBER: _ClassVar[int]
    content: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    cost_usd: float
    latency_ms: float
    refused: bool
    prompt_tokens: int
    completion_tokens: int
    memory_mib: float
    image_urls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, content: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ..., cost_usd: _Optional[float] = ..., latency_ms: _Optional[float] = ..., refused: _Optional[bool] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., memory_mib: _Optional[float] = ..., image_urls: _Optional[_Iterable[str]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "input", "expected_output", "context", "conversation", "expected_tool_calls", "response", "metadata", "human_verdicts")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class HumanVerdictsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    HUMAN_VERDICTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    input: str
    expected_output: str
    context: str
    conversation: _containers.RepeatedCompositeFieldContainer[Message]
    expected_tool_calls: _containers.RepeatedScalarFieldContainer[str]
    response: Response
    metadata: _containers.ScalarMap[str, str]
    human_verdicts: _containers.ScalarMap[str, bool]
    def __init__(self, id: _Optional[str] = ..., input: _Optional[str] = ..., expected_output: _Optional[str] = ..., context: _Optional[str] = ..., conversation: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., expected_tool_calls: _Optional[_Iterable[str]] = ..., response: _Optional[_Union[Response, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., human_verdicts: _Optional[_Mapping[str, bool]] = ...) -> None: ...
