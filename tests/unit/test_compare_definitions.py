"""CompareRuns' "definition changed" check (evalsvc.runs.compare.changed_definitions) on runs it cannot make
any more: a run created before runs recorded their judges' model has it empty."""

from __future__ import annotations

from evalsvc.runs.compare import changed_definitions
from evalsvc.v1 import grader_pb2, run_pb2, target_pb2

Judge = grader_pb2.LlmJudge


def _run(*judges: Judge) -> run_pb2.Run:
    return run_pb2.Run(graders=[grader_pb2.Grader(name=f"j{i}", llm_judge=j) for i, j in enumerate(judges)])


def test_an_old_run_without_a_model_is_taken_as_graded_by_the_current_default() -> None:
    """The empty model of an old run was graded with some server's --judge-model: taken as today's, it is
    the same judge as a new run's recorded default, and a changed one when today's default is another
    (the documented limit: an old run graded under another default is not told apart)."""
    old = _run(Judge(mode=Judge.MODE_ACCURACY))
    new = _run(Judge(mode=Judge.MODE_ACCURACY, model="gpt-judge"))
    assert changed_definitions(old, new, "gpt-judge") == frozenset()
    assert changed_definitions(new, old, "gpt-judge") == frozenset()
    assert changed_definitions(old, new, "other-judge") == {"j0"}


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
