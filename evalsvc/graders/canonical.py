"""A grader spec in canonical form: what it grades with, its defaults filled in, what it does not use left out.

Two specs that grade every output alike have the same canonical form, so CompareRuns (evalsvc.runs.compare)
can tell a changed grader from one spelled another way: `similarity{}` and `similarity{threshold: 0.8}`
(0 means 0.8), a judge threshold 0 and 7, criteria scoring unset and BINARY, a judge model left empty
and the server's default spelled out. Reported as changed, each turned a grader into NO_PAIRS and a
comparison gate into NO VERDICT. The defaults are the constants the graders themselves read
(builtin.DEFAULT_SIMILARITY_THRESHOLD, judge.DEFAULT_THRESHOLD, judge.fill_default_model), never copies.

Apart from `builtin` and `judge`, as `validation` is, because it needs both: the grading processes import
only `builtin`.
"""

from __future__ import annotations

from evalsvc.graders.builtin import DEFAULT_SIMILARITY_THRESHOLD
from evalsvc.graders.judge import DEFAULT_THRESHOLD, Judge, fill_default_model
from evalsvc.v1 import grader_pb2


def canonical_grader(spec: grader_pb2.Grader, default_model: str) -> grader_pb2.Grader:
    """A copy of `spec` in canonical form; `default_model` (the server's --judge-model) stands for an empty
    judge model (the model its run recorded as the default: `Run.default_judge_model`).

    - similarity: a threshold of 0 (or -0.0) is the default it means;
    - cost: a maximum of -0.0 is 0;
    - LLM judge: the model filled in; a threshold of 0 is the default it means; scoring unset is BINARY in
      criteria mode, and left out in the other modes, which ignore it; the endpoint's timeout left out (a
      timeout decides whether a call errs, never a verdict, and an errored evaluation is never paired), and
      the whole endpoint when it has no base_url (the server's default endpoint is used, none of its fields).
      A different api_key_secret stays a change: it may be another key, account or deployment.

    Name and weight are kept (CompareRuns leaves them out itself)."""
    out = grader_pb2.Grader()
    out.CopyFrom(spec)
    kind = out.WhichOneof("kind")
    if kind == "similarity":
        out.similarity.threshold = out.similarity.threshold or DEFAULT_SIMILARITY_THRESHOLD
    elif kind == "cost":
        out.cost.max_usd += 0.0  # -0.0 + 0.0 is 0.0, which proto3 then leaves out, as an unset 0
    elif kind == "llm_judge":
        fill_default_model(out, default_model)
        judge = out.llm_judge
        judge.threshold = judge.threshold or DEFAULT_THRESHOLD
        if judge.mode == Judge.MODE_CRITERIA:
            judge.scoring = judge.scoring or Judge.SCORING_BINARY
        else:
            judge.ClearField("scoring")
        judge.endpoint.ClearField("timeout_s")
        if not judge.endpoint.base_url:
            judge.ClearField("endpoint")
    return out
