import datetime

from evalsvc.v1 import cache_pb2 as _cache_pb2
from evalsvc.v1 import comparison_pb2 as _comparison_pb2
from evalsvc.v1 import grader_pb2 as _grader_pb2
from evalsvc.v1 import item_pb2 as _item_pb2
from evalsvc.v1 import run_pb2 as _run_pb2
from evalsvc.v1 import target_pb2 as _target_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_VIEW_UNSPECIFIED: _ClassVar[RunView]
    RUN_VIEW_BASIC: _ClassVar[RunView]
    RUN_VIEW_FULL: _ClassVar[RunView]

class RerunScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RERUN_SCOPE_UNSPECIFIED: _ClassVar[RerunScope]
    RERUN_SCOPE_ITEMS_ERRORED: _ClassVar[RerunScope]
    RERUN_SCOPE_ITEMS_FAILED_OR_ERRORED: _ClassVar[RerunScope]
    RERUN_SCOPE_ITEMS_ALL: _ClassVar[RerunScope]
RUN_VIEW_UNSPECIFIED: RunView
RUN_VIEW_BASIC: RunView
RUN_VIEW_FULL: RunView
RERUN_SCOPE_UNSPECIFIED: RerunScope
RERUN_SCOPE_ITEMS_ERRORED: RerunScope
RERUN_SCOPE_ITEMS_FAILED_OR_ERRORED: RerunScope
RERUN_SCOPE_ITEMS_ALL: RerunScope

class CreateRunRequest(_message.Message):
    __slots__ = ("request_id", "dataset_id", "item_ids", "items", "target", "graders", "display_name", "description", "labels", "pass_threshold", "repetitions", "warmup_runs", "trigger", "max_cost_usd", "annotations", "max_error_rate", "cache_mode")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    GRADERS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PASS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REPETITIONS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RUNS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    CACHE_MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    dataset_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    items: _containers.RepeatedCompositeFieldContainer[_item_pb2.Item]
    target: _target_pb2.Target
    graders: _containers.RepeatedCompositeFieldContainer[_grader_pb2.Grader]
    display_name: str
    description: str
    labels: _containers.ScalarMap[str, str]
    pass_threshold: float
    repetitions: int
    warmup_runs: int
    trigger: _run_pb2.Trigger
    max_cost_usd: float
    annotations: _containers.ScalarMap[str, str]
    max_error_rate: float
    cache_mode: _cache_pb2.CacheMode
    def __init__(self, request_id: _Optional[str] = ..., dataset_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., items: _Optional[_Iterable[_Union[_item_pb2.Item, _Mapping]]] = ..., target: _Optional[_Union[_target_pb2.Target, _Mapping]] = ..., graders: _Optional[_Iterable[_Union[_grader_pb2.Grader, _Mapping]]] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., pass_threshold: _Optional[float] = ..., repetitions: _Optional[int] = ..., warmup_runs: _Optional[int] = ..., trigger: _Optional[_Union[_run_pb2.Trigger, str]] = ..., max_cost_usd: _Optional[float] = ..., annotations: _Optional[_Mapping[str, str]] = ..., max_error_rate: _Optional[float] = ..., cache_mode: _Optional[_Union[_cache_pb2.CacheMode, str]] = ...) -> None: ...

class CreateRunResponse(_message.Message):
    __slots__ = ("run", "job_count")
    RUN_FIELD_NUMBER: _ClassVar[int]
    JOB_COUNT_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    job_count: int
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., job_count: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "statuses", "labels", "dataset_id", "show_deleted", "filter", "order_by", "view")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SHOW_DELETED_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    statuses: _containers.RepeatedScalarFieldContainer[_run_pb2.RunStatus]
    labels: _containers.ScalarMap[str, str]
    dataset_id: str
    show_deleted: bool
    filter: str
    order_by: str
    view: RunView
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[_run_pb2.RunStatus, str]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., dataset_id: _Optional[str] = ..., show_deleted: _Optional[bool] = ..., filter: _Optional[str] = ..., order_by: _Optional[str] = ..., view: _Optional[_Union[RunView, str]] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[_run_pb2.Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[_run_pb2.Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateRunRequest(_message.Message):
    __slots__ = ("run_id", "run", "update_mask")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    run: _run_pb2.Run
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, run_id: _Optional[str] = ..., run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run_id", "etag")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    etag: str
    def __init__(self, run_id: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class DeleteRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class UndeleteRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class UndeleteRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class RerunRunRequest(_message.Message):
    __slots__ = ("run_id", "request_id", "scope", "trigger", "cache_mode")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    CACHE_MODE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    request_id: str
    scope: RerunScope
    trigger: _run_pb2.Trigger
    cache_mode: _cache_pb2.CacheMode
    def __init__(self, run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., scope: _Optional[_Union[RerunScope, str]] = ..., trigger: _Optional[_Union[_run_pb2.Trigger, str]] = ..., cache_mode: _Optional[_Union[_cache_pb2.CacheMode, str]] = ...) -> None: ...

class RerunRunResponse(_message.Message):
    __slots__ = ("run", "job_count")
    RUN_FIELD_NUMBER: _ClassVar[int]
    JOB_COUNT_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    job_count: int
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., job_count: _Optional[int] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class ListRunResultsRequest(_message.Message):
    __slots__ = ("run_id", "page_size", "page_token", "state", "states")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    page_size: int
    page_token: str
    state: _run_pb2.ResultState
    states: _containers.RepeatedScalarFieldContainer[_run_pb2.ResultState]
    def __init__(self, run_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[_run_pb2.ResultState, str]] = ..., states: _Optional[_Iterable[_Union[_run_pb2.ResultState, str]]] = ...) -> None: ...

class ListRunResultsResponse(_message.Message):
    __slots__ = ("results", "next_page_token")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_run_pb2.Result]
    next_page_token: str
    def __init__(self, results: _Optional[_Iterable[_Union[_run_pb2.Result, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "after_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class WatchRunBatchedRequest(_message.Message):
    __slots__ = ("run_id", "after_seq", "max_events")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    max_events: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., max_events: _Optional[int] = ...) -> None: ...

class WatchRunBatchedResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[WatchRunResponse]
    def __init__(self, events: _Optional[_Iterable[_Union[WatchRunResponse, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("last_seq",)
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    def __init__(self, last_seq: _Optional[int] = ...) -> None: ...

class WatchRunResponse(_message.Message):
    __slots__ = ("seq", "event_time", "counts", "run", "result", "heartbeat")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    event_time: _timestamp_pb2.Timestamp
    counts: _run_pb2.RunCounts
    run: _run_pb2.Run
    result: _run_pb2.Result
    heartbeat: Heartbeat
    def __init__(self, seq: _Optional[int] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., counts: _Optional[_Union[_run_pb2.RunCounts, _Mapping]] = ..., run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., result: _Optional[_Union[_run_pb2.Result, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...
