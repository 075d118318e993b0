import datetime

from evalsvc.v1 import item_pb2 as _item_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Conversation(_message.Message):
    __slots__ = ("item_id", "turns", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    turns: _containers.RepeatedCompositeFieldContainer[_item_pb2.Message]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, item_id: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[_item_pb2.Message, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ContinueConversationsRequest(_message.Message):
    __slots__ = ("dataset_id", "instructions", "conversations")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    instructions: str
    conversations: _containers.RepeatedCompositeFieldContainer[Conversation]
    def __init__(self, dataset_id: _Optional[str] = ..., instructions: _Optional[str] = ..., conversations: _Optional[_Iterable[_Union[Conversation, _Mapping]]] = ...) -> None: ...

class ContinueConversationsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_item_pb2.Item]
    def __init__(self, items: _Optional[_Iterable[_Union[_item_pb2.Item, _Mapping]]] = ...) -> None: ...

class DatasetGeneration(_message.Message):
    __slots__ = ("state", "item_count", "generated_count", "error", "create_time", "update_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[DatasetGeneration.State]
        STATE_PENDING: _ClassVar[DatasetGeneration.State]
        STATE_RUNNING: _ClassVar[DatasetGeneration.State]
        STATE_SUCCEEDED: _ClassVar[DatasetGeneration.State]
        STATE_FAILED: _ClassVar[DatasetGeneration.State]
    STATE_UNSPECIFIED: DatasetGeneration.State
    STATE_PENDING: DatasetGeneration.State
    STATE_RUNNING: DatasetGeneration.State
    STATE_SUCCEEDED: DatasetGeneration.State
    STATE_FAILED: DatasetGeneration.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    state: DatasetGeneration.State
    item_count: int
    generated_count: int
    error: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, state: _Optional[_Union[DatasetGeneration.State, str]] = ..., item_count: _Optional[int] = ..., generated_count: _Optional[int] = ..., error: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GenerateDatasetItemsRequest(_message.Message):
    __slots__ = ("dataset_id", "item_count", "instructions", "validate_only")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    item_count: int
    instructions: str
    validate_only: bool
    def __init__(self, dataset_id: _Optional[str] = ..., item_count: _Optional[int] = ..., instructions: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class GenerateDatasetItemsResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: DatasetGeneration
    def __init__(self, generation: _Optional[_Union[DatasetGeneration, _Mapping]] = ...) -> None: ...
