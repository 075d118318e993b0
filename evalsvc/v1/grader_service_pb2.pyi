import datetime

from evalsvc.v1 import grader_pb2 as _grader_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SavedGrader(_message.Message):
    __slots__ = ("id", "display_name", "description", "labels", "version", "latest_version", "grader", "create_time", "version_create_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRADER_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    display_name: str
    description: str
    labels: _containers.ScalarMap[str, str]
    version: int
    latest_version: int
    grader: _grader_pb2.Grader
    create_time: _timestamp_pb2.Timestamp
    version_create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., version: _Optional[int] = ..., latest_version: _Optional[int] = ..., grader: _Optional[_Union[_grader_pb2.Grader, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version_create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateGraderRequest(_message.Message):
    __slots__ = ("grader", "request_id")
    GRADER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    grader: SavedGrader
    request_id: str
    def __init__(self, grader: _Optional[_Union[SavedGrader, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateGraderResponse(_message.Message):
    __slots__ = ("grader",)
    GRADER_FIELD_NUMBER: _ClassVar[int]
    grader: SavedGrader
    def __init__(self, grader: _Optional[_Union[SavedGrader, _Mapping]] = ...) -> None: ...

class GetGraderRequest(_message.Message):
    __slots__ = ("grader_id", "version")
    GRADER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    grader_id: str
    version: int
    def __init__(self, grader_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetGraderResponse(_message.Message):
    __slots__ = ("grader",)
    GRADER_FIELD_NUMBER: _ClassVar[int]
    grader: SavedGrader
    def __init__(self, grader: _Optional[_Union[SavedGrader, _Mapping]] = ...) -> None: ...

class ListGradersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListGradersResponse(_message.Message):
    __slots__ = ("graders", "next_page_token")
    GRADERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    graders: _containers.RepeatedCompositeFieldContainer[SavedGrader]
    next_page_token: str
    def __init__(self, graders: _Optional[_Iterable[_Union[SavedGrader, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateGraderRequest(_message.Message):
    __slots__ = ("grader_id", "grader")
    GRADER_ID_FIELD_NUMBER: _ClassVar[int]
    GRADER_FIELD_NUMBER: _ClassVar[int]
    grader_id: str
    grader: _grader_pb2.Grader
    def __init__(self, grader_id: _Optional[str] = ..., grader: _Optional[_Union[_grader_pb2.Grader, _Mapping]] = ...) -> None: ...

class UpdateGraderResponse(_message.Message):
    __slots__ = ("grader",)
    GRADER_FIELD_NUMBER: _ClassVar[int]
    grader: SavedGrader
    def __init__(self, grader: _Optional[_Union[SavedGrader, _Mapping]] = ...) -> None: ...

class DeleteGraderRequest(_message.Message):
    __slots__ = ("grader_id",)
    GRADER_ID_FIELD_NUMBER: _ClassVar[int]
    grader_id: str
    def __init__(self, grader_id: _Optional[str] = ...) -> None: ...

class DeleteGraderResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
