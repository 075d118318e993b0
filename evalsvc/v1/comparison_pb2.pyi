from evalsvc.v1 import run_pb2 as _run_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComparisonVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARISON_VERDICT_UNSPECIFIED: _ClassVar[ComparisonVerdict]
    COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE: _ClassVar[ComparisonVerdict]
    COMPARISON_VERDICT_REGRESSED: _ClassVar[ComparisonVerdict]
    COMPARISON_VERDICT_IMPROVED: _ClassVar[ComparisonVerdict]
    COMPARISON_VERDICT_NO_PAIRS: _ClassVar[ComparisonVerdict]

class ComparisonChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARISON_CHANGE_UNSPECIFIED: _ClassVar[ComparisonChange]
    COMPARISON_CHANGE_REGRESSED: _ClassVar[ComparisonChange]
    COMPARISON_CHANGE_IMPROVED: _ClassVar[ComparisonChange]
    COMPARISON_CHANGE_BOTH_PASSED: _ClassVar[ComparisonChange]
    COMPARISON_CHANGE_BOTH_FAILED: _ClassVar[ComparisonChange]
    COMPARISON_CHANGE_UNPAIRED: _ClassVar[ComparisonChange]

class UnpairedReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNPAIRED_REASON_UNSPECIFIED: _ClassVar[UnpairedReason]
    UNPAIRED_REASON_ONE_RUN: _ClassVar[UnpairedReason]
    UNPAIRED_REASON_ITEM_CHANGED: _ClassVar[UnpairedReason]
    UNPAIRED_REASON_DEFINITION_CHANGED: _ClassVar[UnpairedReason]
    UNPAIRED_REASON_NOT_GRADED: _ClassVar[UnpairedReason]
COMPARISON_VERDICT_UNSPECIFIED: ComparisonVerdict
COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE: ComparisonVerdict
COMPARISON_VERDICT_REGRESSED: ComparisonVerdict
COMPARISON_VERDICT_IMPROVED: ComparisonVerdict
COMPARISON_VERDICT_NO_PAIRS: ComparisonVerdict
COMPARISON_CHANGE_UNSPECIFIED: ComparisonChange
COMPARISON_CHANGE_REGRESSED: ComparisonChange
COMPARISON_CHANGE_IMPROVED: ComparisonChange
COMPARISON_CHANGE_BOTH_PASSED: ComparisonChange
COMPARISON_CHANGE_BOTH_FAILED: ComparisonChange
COMPARISON_CHANGE_UNPAIRED: ComparisonChange
UNPAIRED_REASON_UNSPECIFIED: UnpairedReason
UNPAIRED_REASON_ONE_RUN: UnpairedReason
UNPAIRED_REASON_ITEM_CHANGED: UnpairedReason
UNPAIRED_REASON_DEFINITION_CHANGED: UnpairedReason
UNPAIRED_REASON_NOT_GRADED: UnpairedReason

class CompareRunsRequest(_message.Message):
    __slots__ = ("baseline_run_id", "candidate_run_id", "alpha")
    BASELINE_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    baseline_run_id: str
    candidate_run_id: str
    alpha: float
    def __init__(self, baseline_run_id: _Optional[str] = ..., candidate_run_id: _Optional[str] = ..., alpha: _Optional[float] = ...) -> None: ...

class CompareRunsResponse(_message.Message):
    __slots__ = ("comparison",)
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    comparison: RunComparison
    def __init__(self, comparison: _Optional[_Union[RunComparison, _Mapping]] = ...) -> None: ...

class RunComparison(_message.Message):
    __slots__ = ("baseline_run_id", "candidate_run_id", "alpha", "partial", "graders", "overall", "changed_items")
    BASELINE_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    GRADERS_FIELD_NUMBER: _ClassVar[int]
    OVERALL_FIELD_NUMBER: _ClassVar[int]
    CHANGED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    baseline_run_id: str
    candidate_run_id: str
    alpha: float
    partial: bool
    graders: _containers.RepeatedCompositeFieldContainer[GraderComparison]
    overall: GraderComparison
    changed_items: int
    def __init__(self, baseline_run_id: _Optional[str] = ..., candidate_run_id: _Optional[str] = ..., alpha: _Optional[float] = ..., partial: _Optional[bool] = ..., graders: _Optional[_Iterable[_Union[GraderComparison, _Mapping]]] = ..., overall: _Optional[_Union[GraderComparison, _Mapping]] = ..., changed_items: _Optional[int] = ...) -> None: ...

class GraderComparison(_message.Message):
    __slots__ = ("grader", "pairs", "both_passed", "both_failed", "regressed", "improved", "unpaired", "baseline_pass_rate", "candidate_pass_rate", "pass_rate_delta", "delta_ci_low", "delta_ci_high", "mcnemar_p_value", "mean_score_delta", "score_delta_ci_low", "score_delta_ci_high", "verdict", "baseline_mean_score", "candidate_mean_score", "definition_changed")
    GRADER_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    BOTH_PASSED_FIELD_NUMBER: _ClassVar[int]
    BOTH_FAILED_FIELD_NUMBER: _ClassVar[int]
    REGRESSED_FIELD_NUMBER: _ClassVar[int]
    IMPROVED_FIELD_NUMBER: _ClassVar[int]
    UNPAIRED_FIELD_NUMBER: _ClassVar[int]
    BASELINE_PASS_RATE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PASS_RATE_FIELD_NUMBER: _ClassVar[int]
    PASS_RATE_DELTA_FIELD_NUMBER: _ClassVar[int]
    DELTA_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    DELTA_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    MCNEMAR_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_DELTA_FIELD_NUMBER: _ClassVar[int]
    SCORE_DELTA_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    SCORE_DELTA_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_CHANGED_FIELD_NUMBER: _ClassVar[int]
    grader: str
    pairs: int
    both_passed: int
    both_failed: int
    regressed: int
    improved: int
    unpaired: int
    baseline_pass_rate: float
    candidate_pass_rate: float
    pass_rate_delta: float
    delta_ci_low: float
    delta_ci_high: float
    mcnemar_p_value: float
    mean_score_delta: float
    score_delta_ci_low: float
    score_delta_ci_high: float
    verdict: ComparisonVerdict
    baseline_mean_score: float
    candidate_mean_score: float
    definition_changed: bool
    def __init__(self, grader: _Optional[str] = ..., pairs: _Optional[int] = ..., both_passed: _Optional[int] = ..., both_failed: _Optional[int] = ..., regressed: _Optional[int] = ..., improved: _Optional[int] = ..., unpaired: _Optional[int] = ..., baseline_pass_rate: _Optional[float] = ..., candidate_pass_rate: _Optional[float] = ..., pass_rate_delta: _Optional[float] = ..., delta_ci_low: _Optional[float] = ..., delta_ci_high: _Optional[float] = ..., mcnemar_p_value: _Optional[float] = ..., mean_score_delta: _Optional[float] = ..., score_delta_ci_low: _Optional[float] = ..., score_delta_ci_high: _Optional[float] = ..., verdict: _Optional[_Union[ComparisonVerdict, str]] = ..., baseline_mean_score: _Optional[float] = ..., candidate_mean_score: _Optional[float] = ..., definition_changed: _Optional[bool] = ...) -> None: ...

class ListComparisonItemsRequest(_message.Message):
    __slots__ = ("baseline_run_id", "candidate_run_id", "grader", "change", "page_size", "page_token")
    BASELINE_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GRADER_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    baseline_run_id: str
    candidate_run_id: str
    grader: str
    change: ComparisonChange
    page_size: int
    page_token: str
    def __init__(self, baseline_run_id: _Optional[str] = ..., candidate_run_id: _Optional[str] = ..., grader: _Optional[str] = ..., change: _Optional[_Union[ComparisonChange, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListComparisonItemsResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ComparisonItem]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[ComparisonItem, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ComparisonItem(_message.Message):
    __slots__ = ("item_id", "repetition", "grader", "change", "baseline", "candidate", "unpaired_reason")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REPETITION_FIELD_NUMBER: _ClassVar[int]
    GRADER_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    UNPAIRED_REASON_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    repetition: int
    grader: str
    change: ComparisonChange
    baseline: _run_pb2.Result
    candidate: _run_pb2.Result
    unpaired_reason: UnpairedReason
    def __init__(self, item_id: _Optional[str] = ..., repetition: _Optional[int] = ..., grader: _Optional[str] = ..., change: _Optional[_Union[ComparisonChange, str]] = ..., baseline: _Optional[_Union[_run_pb2.Result, _Mapping]] = ..., candidate: _Optional[_Union[_run_pb2.Result, _Mapping]] = ..., unpaired_reason: _Optional[_Union[UnpairedReason, str]] = ...) -> None: ...
