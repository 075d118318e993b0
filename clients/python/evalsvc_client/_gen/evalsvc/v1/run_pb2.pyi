import datetime

from evalsvc_client._gen.evalsvc.v1 import cache_pb2 as _cache_pb2
from evalsvc_client._gen.evalsvc.v1 import grader_pb2 as _grader_pb2
from evalsvc_client._gen.evalsvc.v1 import item_pb2 as _item_pb2
from evalsvc_client._gen.evalsvc.v1 import target_pb2 as _target_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_PENDING: _ClassVar[RunStatus]
    RUN_STATUS_RUNNING: _ClassVar[RunStatus]
    RUN_STATUS_SUCCEEDED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]
    RUN_STATUS_CANCELLED: _ClassVar[RunStatus]

class Trigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIGGER_UNSPECIFIED: _ClassVar[Trigger]
    TRIGGER_MANUAL: _ClassVar[Trigger]
    TRIGGER_AUTO: _ClassVar[Trigger]
    TRIGGER_BACKFILL: _ClassVar[Trigger]

class ResultState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_STATE_UNSPECIFIED: _ClassVar[ResultState]
    RESULT_STATE_PASSED: _ClassVar[ResultState]
    RESULT_STATE_FAILED: _ClassVar[ResultState]
    RESULT_STATE_ERROR: _ClassVar[ResultState]
    RESULT_STATE_SKIPPED: _ClassVar[ResultState]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_PENDING: RunStatus
RUN_STATUS_RUNNING: RunStatus
RUN_STATUS_SUCCEEDED: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_STATUS_CANCELLED: RunStatus
TRIGGER_UNSPECIFIED: Trigger
TRIGGER_MANUAL: Trigger
TRIGGER_AUTO: Trigger
TRIGGER_BACKFILL: Trigger
RESULT_STATE_UNSPECIFIED: ResultState
RESULT_STATE_PASSED: ResultState
RESULT_STATE_FAILED: ResultState
RESULT_STATE_ERROR: ResultState
RESULT_STATE_SKIPPED: ResultState

class RunCounts(_message.Message):
    __slots__ = ("total_items", "total_evaluations", "completed_evaluations", "passed", "failed", "errored", "skipped")
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    total_items: int
    total_evaluations: int
    completed_evaluations: int
    passed: int
    failed: int
    errored: int
    skipped: int
    def __init__(self, total_items: _Optional[int] = ..., total_evaluations: _Optional[int] = ..., completed_evaluations: _Optional[int] = ..., passed: _Optional[int] = ..., failed: _Optional[int] = ..., errored: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...

class LatencyStats(_message.Message):
    __slots__ = ("p50_ms", "p95_ms", "p99_ms", "mean_ms")
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    def __init__(self, p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., mean_ms: _Optional[float] = ...) -> None: ...

class MemoryStats(_message.Message):
    __slots__ = ("mean_mib", "p50_mib", "p95_mib", "max_mib", "samples")
    MEAN_MIB_FIELD_NUMBER: _ClassVar[int]
    P50_MIB_FIELD_NUMBER: _ClassVar[int]
    P95_MIB_FIELD_NUMBER: _ClassVar[int]
    MAX_MIB_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    mean_mib: float
    p50_mib: float
    p95_mib: float
    max_mib: float
    samples: int
    def __init__(self, mean_mib: _Optional[float] = ..., p50_mib: _Optional[float] = ..., p95_mib: _Optional[float] = ..., max_mib: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class GraderAggregate(_message.Message):
    __slots__ = ("grader", "pass_rate", "mean_score", "passed", "failed", "errored", "std_error", "agreement")
    GRADER_FIELD_NUMBER: _ClassVar[int]
    PASS_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORED_FIELD_NUMBER: _ClassVar[int]
    STD_ERROR_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    grader: str
    pass_rate: float
    mean_score: float
    passed: int
    failed: int
    errored: int
    std_error: float
    agreement: HumanAgreement
    def __init__(self, grader: _Optional[str] = ..., pass_rate: _Optional[float] = ..., mean_score: _Optional[float] = ..., passed: _Optional[int] = ..., failed: _Optional[int] = ..., errored: _Optional[int] = ..., std_error: _Optional[float] = ..., agreement: _Optional[_Union[HumanAgreement, _Mapping]] = ...) -> None: ...

class HumanAgreement(_message.Message):
    __slots__ = ("both_passed", "both_failed", "grader_passed_person_failed", "grader_failed_person_passed", "errored", "accuracy", "cohen_kappa")
    BOTH_PASSED_FIELD_NUMBER: _ClassVar[int]
    BOTH_FAILED_FIELD_NUMBER: _ClassVar[int]
    GRADER_PASSED_PERSON_FAILED_FIELD_NUMBER: _ClassVar[int]
    GRADER_FAILED_PERSON_PASSED_FIELD_NUMBER: _ClassVar[int]
    ERRORED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    COHEN_KAPPA_FIELD_NUMBER: _ClassVar[int]
    both_passed: int
    both_failed: int
    grader_passed_person_failed: int
    grader_failed_person_passed: int
    errored: int
    accuracy: float
    cohen_kappa: float
    def __init__(self, both_passed: _Optional[int] = ..., both_failed: _Optional[int] = ..., grader_passed_person_failed: _Optional[int] = ..., grader_failed_person_passed: _Optional[int] = ..., errored: _Optional[int] = ..., accuracy: _Optional[float] = ..., cohen_kappa: _Optional[float] = ...) -> None: ...

class RunAggregate(_message.Message):
    __slots__ = ("pass_rate", "mean_score", "graders", "total_cost_usd", "latency", "scoring_cost_usd", "std_error", "mean_item_score", "memory", "cache_hits", "cost_saved_usd")
    PASS_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    GRADERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_USD_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    SCORING_COST_USD_FIELD_NUMBER: _ClassVar[int]
    STD_ERROR_FIELD_NUMBER: _ClassVar[int]
    MEAN_ITEM_SCORE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    COST_SAVED_USD_FIELD_NUMBER: _ClassVar[int]
    pass_rate: float
    mean_score: float
    graders: _containers.RepeatedCompositeFieldContainer[GraderAggregate]
    total_cost_usd: float
    latency: LatencyStats
    scoring_cost_usd: float
    std_error: float
    mean_item_score: float
    memory: MemoryStats
    cache_hits: int
    cost_saved_usd: float
    def __init__(self, pass_rate: _Optional[float] = ..., mean_score: _Optional[float] = ..., graders: _Optional[_Iterable[_Union[GraderAggregate, _Mapping]]] = ..., total_cost_usd: _Optional[float] = ..., latency: _Optional[_Union[LatencyStats, _Mapping]] = ..., scoring_cost_usd: _Optional[float] = ..., std_error: _Optional[float] = ..., mean_item_score: _Optional[float] = ..., memory: _Optional[_Union[MemoryStats, _Mapping]] = ..., cache_hits: _Optional[int] = ..., cost_saved_usd: _Optional[float] = ...) -> None: ...

class RunError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("id", "display_name", "description", "labels", "dataset_id", "run_number", "target", "graders", "pass_threshold", "repetitions", "warmup_runs", "trigger", "status", "counts", "aggregate", "overall_passed", "error", "create_time", "start_time", "end_time", "update_time", "last_seq", "request_id", "max_cost_usd", "cost_usd", "annotations", "delete_time", "max_error_rate", "rerun_of", "default_judge_model", "etag", "cache_mode")
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
    ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    GRADERS_FIELD_NUMBER: _ClassVar[int]
    PASS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REPETITIONS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RUNS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    OVERALL_PASSED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    DELETE_TIME_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    RERUN_OF_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JUDGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    CACHE_MODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    display_name: str
    description: str
    labels: _containers.ScalarMap[str, str]
    dataset_id: str
    run_number: int
    target: _target_pb2.Target
    graders: _containers.RepeatedCompositeFieldContainer[_grader_pb2.Grader]
    pass_threshold: float
    repetitions: int
    warmup_runs: int
    trigger: Trigger
    status: RunStatus
    counts: RunCounts
    aggregate: RunAggregate
    overall_passed: bool
    error: RunError
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    last_seq: int
    request_id: str
    max_cost_usd: float
    cost_usd: float
    annotations: _containers.ScalarMap[str, str]
    delete_time: _timestamp_pb2.Timestamp
    max_error_rate: float
    rerun_of: str
    default_judge_model: str
    etag: str
    cache_mode: _cache_pb2.CacheMode
    def __init__(self, id: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., dataset_id: _Optional[str] = ..., run_number: _Optional[int] = ..., target: _Optional[_Union[_target_pb2.Target, _Mapping]] = ..., graders: _Optional[_Iterable[_Union[_grader_pb2.Grader, _Mapping]]] = ..., pass_threshold: _Optional[float] = ..., repetitions: _Optional[int] = ..., warmup_runs: _Optional[int] = ..., trigger: _Optional[_Union[Trigger, str]] = ..., status: _Optional[_Union[RunStatus, str]] = ..., counts: _Optional[_Union[RunCounts, _Mapping]] = ..., aggregate: _Optional[_Union[RunAggregate, _Mapping]] = ..., overall_passed: _Optional[bool] = ..., error: _Optional[_Union[RunError, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seq: _Optional[int] = ..., request_id: _Optional[str] = ..., max_cost_usd: _Optional[float] = ..., cost_usd: _Optional[float] = ..., annotations: _Optional[_Mapping[str, str]] = ..., delete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., max_error_rate: _Optional[float] = ..., rerun_of: _Optional[str] = ..., default_judge_model: _Optional[str] = ..., etag: _Optional[str] = ..., cache_mode: _Optional[_Union[_cache_pb2.CacheMode, str]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("id", "run_id", "item_id", "repetition", "grader", "state", "score", "raw_score", "passed", "explanation", "output", "cost_usd", "latency_ms", "error_reason", "attempt", "complete_time", "scoring_cost_usd", "confidence", "cached", "verdict_cached", "human_verdict", "output_truncated", "explanation_truncated")
    ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REPETITION_FIELD_NUMBER: _ClassVar[int]
    GRADER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    SCORING_COST_USD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_CACHED_FIELD_NUMBER: _ClassVar[int]
    HUMAN_VERDICT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    run_id: str
    item_id: str
    repetition: int
    grader: str
    state: ResultState
    score: float
    raw_score: float
    passed: bool
    explanation: str
    output: _item_pb2.Response
    cost_usd: float
    latency_ms: float
    error_reason: str
    attempt: int
    complete_time: _timestamp_pb2.Timestamp
    scoring_cost_usd: float
    confidence: float
    cached: bool
    verdict_cached: bool
    human_verdict: bool
    output_truncated: bool
    explanation_truncated: bool
    def __init__(self, id: _Optional[str] = ..., run_id: _Optional[str] = ..., item_id: _Optional[str] = ..., repetition: _Optional[int] = ..., grader: _Optional[str] = ..., state: _Optional[_Union[ResultState, str]] = ..., score: _Optional[float] = ..., raw_score: _Optional[float] = ..., passed: _Optional[bool] = ..., explanation: _Optional[str] = ..., output: _Optional[_Union[_item_pb2.Response, _Mapping]] = ..., cost_usd: _Optional[float] = ..., latency_ms: _Optional[float] = ..., error_reason: _Optional[str] = ..., attempt: _Optional[int] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scoring_cost_usd: _Optional[float] = ..., confidence: _Optional[float] = ..., cached: _Optional[bool] = ..., verdict_cached: _Optional[bool] = ..., human_verdict: _Optional[bool] = ..., output_truncated: _Optional[bool] = ..., explanation_truncated: _Optional[bool] = ...) -> None: ...
