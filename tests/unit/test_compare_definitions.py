"""CompareRuns' "definition changed" check (evalsvc.runs.compare.changed_definitions), on runs as CreateRun
stores them and on runs it cannot make any more: a run created before runs recorded their default judge
model (`Run.default_judge_model`) has none."""

from __future__ import annotations

from evalsvc.runs.compare import changed_definitions
from evalsvc.v1 import grader_pb2, run_pb2, target_pb2

Judge = grader_pb2.LlmJudge


def _run(*judges: Judge) -> run_pb2.Run:
    return run_pb2.Run(graders=[grader_pb2.Grader(name=f"j{i}", llm_judge=j) for i, j in enumerate(judges)])


def test_a_judge_without_a_model_is_compared_by_its_runs_recorded_default_else_the_current_one() -> None:
    """A judge naming no model is graded by the default judge's model, which a run records when it is
    created: two runs of other recorded defaults have a changed judge, of the same one an unchanged judge,
    as is a judge naming that model. An old run recorded none: its model is taken as today's default (the
    documented limit: an old run graded under another default is not told apart)."""
    old = _run(Judge(mode=Judge.MODE_ACCURACY))
    lenient, strict = old.__deepcopy__(), old.__deepcopy__()
    lenient.default_judge_model, strict.default_judge_model = "lenient", "strict"
    named = _run(Judge(mode=Judge.MODE_ACCURACY, model="lenient"))
    assert changed_definitions(lenient, strict, "strict") == {"j0"}
    assert changed_definitions(lenient, lenient, "strict") == frozenset()
    assert changed_definitions(lenient, named, "strict") == frozenset()
    assert changed_definitions(old, strict, "strict") == frozenset()
    assert changed_definitions(old, named, "gpt-judge") == {"j0"}


def test_another_api_key_secret_is_a_change() -> None:
    """It may name another key, account or deployment of the same URL: kept as a change."""
    endpoint = target_pb2.Endpoint(base_url="https://llm.example/v1", api_key_secret="team-a")
    other = target_pb2.Endpoint(base_url="https://llm.example/v1", api_key_secret="team-b")
    same_but_timeout = target_pb2.Endpoint(base_url="https://llm.example/v1", api_key_secret="team-a", timeout_s=9)
    judge = Judge(mode=Judge.MODE_ACCURACY, model="m", endpoint=endpoint)
    assert changed_definitions(_run(judge), _run(Judge(mode=Judge.MODE_ACCURACY, model="m", endpoint=other)), "") == {
        "j0"
    }
    assert (
        changed_definitions(
            _run(judge), _run(Judge(mode=Judge.MODE_ACCURACY, model="m", endpoint=same_but_timeout)), ""
        )
        == frozenset()
    )


def test_scoring_is_left_out_where_the_mode_ignores_it_and_a_different_threshold_is_a_change() -> None:
    """Scoring means nothing outside criteria mode; a threshold other than the default does."""
    accuracy = Judge(mode=Judge.MODE_ACCURACY, model="m")
    assert changed_definitions(_run(accuracy), _run(Judge(mode=Judge.MODE_ACCURACY, model="m", scoring=2)), "") == (
        frozenset()
    )
    assert changed_definitions(_run(accuracy), _run(Judge(mode=Judge.MODE_ACCURACY, model="m", threshold=8)), "") == {
        "j0"
    }
