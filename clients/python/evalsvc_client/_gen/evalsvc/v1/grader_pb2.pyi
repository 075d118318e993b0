from evalsvc_client._gen.evalsvc.v1 import target_pb2 as _target_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Grader(_message.Message):
    __slots__ = ("name", "weight", "exact_match", "contains", "regex", "json_match", "similarity", "tool_calls", "latency", "cost", "llm_judge", "saved")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EXACT_MATCH_FIELD_NUMBER: _ClassVar[int]
    CONTAINS_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    JSON_MATCH_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    LLM_JUDGE_FIELD_NUMBER: _ClassVar[int]
    SAVED_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    exact_match: ExactMatch
    contains: Contains
    regex: Regex
    json_match: JsonMatch
    similarity: Similarity
    tool_calls: ToolCalls
    latency: Latency
    cost: Cost
    llm_judge: LlmJudge
    saved: SavedGraderRef
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., exact_match: _Optional[_Union[ExactMatch, _Mapping]] = ..., contains: _Optional[_Union[Contains, _Mapping]] = ..., regex: _Optional[_Union[Regex, _Mapping]] = ..., json_match: _Optional[_Union[JsonMatch, _Mapping]] = ..., similarity: _Optional[_Union[Similarity, _Mapping]] = ..., tool_calls: _Optional[_Union[ToolCalls, _Mapping]] = ..., latency: _Optional[_Union[Latency, _Mapping]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., llm_judge: _Optional[_Union[LlmJudge, _Mapping]] = ..., saved: _Optional[_Union[SavedGraderRef, _Mapping]] = ...) -> None: ...

class SavedGraderRef(_message.Message):
    __slots__ = ("grader_id", "version")
    GRADER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    grader_id: str
    version: int
    def __init__(self, grader_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class JudgeLevel(_message.Message):
    __slots__ = ("key", "description", "passing")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PASSING_FIELD_NUMBER: _ClassVar[int]
    key: str
    description: str
    passing: bool
    def __init__(self, key: _Optional[str] = ..., description: _Optional[str] = ..., passing: _Optional[bool] = ...) -> None: ...

class LlmJudge(_message.Message):
    __slots__ = ("mode", "criteria", "scoring", "threshold", "levels", "additional_guidelines", "model", "endpoint")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[LlmJudge.Mode]
        MODE_ACCURACY: _ClassVar[LlmJudge.Mode]
        MODE_CRITERIA: _ClassVar[LlmJudge.Mode]
        MODE_LEVELS: _ClassVar[LlmJudge.Mode]
        MODE_POLICY: _ClassVar[LlmJudge.Mode]
    MODE_UNSPECIFIED: LlmJudge.Mode
    MODE_ACCURACY: LlmJudge.Mode
    MODE_CRITERIA: LlmJudge.Mode
    MODE_LEVELS: LlmJudge.Mode
    MODE_POLICY: LlmJudge.Mode
    class Scoring(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SCORING_UNSPECIFIED: _ClassVar[LlmJudge.Scoring]
        SCORING_BINARY: _ClassVar[LlmJudge.Scoring]
        SCORING_NUMERIC: _ClassVar[LlmJudge.Scoring]
    SCORING_UNSPECIFIED: LlmJudge.Scoring
    SCORING_BINARY: LlmJudge.Scoring
    SCORING_NUMERIC: LlmJudge.Scoring
    MODE_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_GUIDELINES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    mode: LlmJudge.Mode
    criteria: str
    scoring: LlmJudge.Scoring
    threshold: int
    levels: _containers.RepeatedCompositeFieldContainer[JudgeLevel]
    additional_guidelines: str
    model: str
    endpoint: _target_pb2.Endpoint
    def __init__(self, mode: _Optional[_Union[LlmJudge.Mode, str]] = ..., criteria: _Optional[str] = ..., scoring: _Optional[_Union[LlmJudge.Scoring, str]] = ..., threshold: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[JudgeLevel, _Mapping]]] = ..., additional_guidelines: _Optional[str] = ..., model: _Optional[str] = ..., endpoint: _Optional[_Union[_target_pb2.Endpoint, _Mapping]] = ...) -> None: ...

class ExactMatch(_message.Message):
    __slots__ = ("case_insensitive", "normalize_whitespace")
    CASE_INSENSITIVE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_WHITESPACE_FIELD_NUMBER: _ClassVar[int]
    case_insensitive: bool
    normalize_whitespace: bool
    def __init__(self, case_insensitive: _Optional[bool] = ..., normalize_whitespace: _Optional[bool] = ...) -> None: ...

class Contains(_message.Message):
    __slots__ = ("values", "all", "case_insensitive")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    CASE_INSENSITIVE_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    case_insensitive: bool
    def __init__(self, values: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ..., case_insensitive: _Optional[bool] = ...) -> None: ...

class Regex(_message.Message):
    __slots__ = ("pattern", "full_match", "case_insensitive")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    FULL_MATCH_FIELD_NUMBER: _ClassVar[int]
    CASE_INSENSITIVE_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    full_match: bool
    case_insensitive: bool
    def __init__(self, pattern: _Optional[str] = ..., full_match: _Optional[bool] = ..., case_insensitive: _Optional[bool] = ...) -> None: ...

class JsonMatch(_message.Message):
    __slots__ = ("subset", "valid_only")
    SUBSET_FIELD_NUMBER: _ClassVar[int]
    VALID_ONLY_FIELD_NUMBER: _ClassVar[int]
    subset: bool
    valid_only: bool
    def __init__(self, subset: _Optional[bool] = ..., valid_only: _Optional[bool] = ...) -> None: ...

class Similarity(_message.Message):
    __slots__ = ("threshold", "case_insensitive")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CASE_INSENSITIVE_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    case_insensitive: bool
    def __init__(self, threshold: _Optional[float] = ..., case_insensitive: _Optional[bool] = ...) -> None: ...

class ToolCalls(_message.Message):
    __slots__ = ("expected", "allow_additional", "expected_arguments")
    class ExpectedArgumentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Struct
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ADDITIONAL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    expected: _containers.RepeatedScalarFieldContainer[str]
    allow_additional: bool
    expected_arguments: _containers.MessageMap[str, _struct_pb2.Struct]
    def __init__(self, expected: _Optional[_Iterable[str]] = ..., allow_additional: _Optional[bool] = ..., expected_arguments: _Optional[_Mapping[str, _struct_pb2.Struct]] = ...) -> None: ...

class Latency(_message.Message):
    __slots__ = ("max_ms",)
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    max_ms: float
    def __init__(self, max_ms: _Optional[float] = ...) -> None: ...

class Cost(_message.Message):
    __slots__ = ("max_usd",)
    MAX_USD_FIELD_NUMBER: _ClassVar[int]
    max_usd: float
    def __init__(self, max_usd: _Optional[float] = ...) -> None: ...
