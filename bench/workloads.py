"""Request builders shared by the load generators, so every scenario sends the same shape of work.

The large run mixes every deterministic grader kind whose outcome does not depend on wall time, each
under a distinct name (a run refuses duplicate names), so the benchmark exercises the grader mix a
real suite would have rather than 50 copies of the cheapest one.
"""

from __future__ import annotations

import json

from evalsvc.v1 import cache_pb2, grader_pb2, item_pb2, target_pb2
from evalsvc.v1 import eval_run_service_pb2 as pb

PROVIDED = target_pb2.Target(provided=target_pb2.ProvidedTarget())


def provided_items(n: int, *, wrong_every: int = 7) -> list[item_pb2.Item]:
    """n items with recorded responses; every `wrong_every`-th one is wrong, so both outcomes occur."""
    items = []
    for i in range(n):
        expected = f"the answer to question {i} is {i * 7 % 1000}"
        content = f"the answer to question {i} is unknown" if wrong_every and i % wrong_every == 0 else expected
        items.append(
            item_pb2.Item(
                id=f"i{i}",
                input=f"question {i}: what is {i} times 7 modulo 1000?",
                expected_output=expected,
                response=item_pb2.Response(content=content, latency_ms=float(i % 50), cost_usd=0.0001),
            )
        )
    return items


def _grader_kinds() -> list[grader_pb2.Grader]:
    """One of each deterministic kind (and option variant); `mixed_graders` cycles through these."""
    G = grader_pb2
    return [
        G.Grader(exact_match=G.ExactMatch()),
        G.Grader(exact_match=G.ExactMatch(case_insensitive=True, normalize_whitespace=True)),
        G.Grader(contains=G.Contains(values=["answer"])),
        G.Grader(contains=G.Contains(values=["ANSWER", "question"], all=True, case_insensitive=True)),
        G.Grader(regex=G.Regex(pattern=r"is \d+$")),
        G.Grader(regex=G.Regex(pattern=r"the answer .* is \w+", full_match=True, case_insensitive=True)),
        G.Grader(similarity=G.Similarity(threshold=0.8)),
        G.Grader(similarity=G.Similarity(threshold=0.95, case_insensitive=True)),
        G.Grader(json_match=G.JsonMatch(valid_only=True)),
        G.Grader(latency=G.Latency(max_ms=40.0)),
        G.Grader(cost=G.Cost(max_usd=0.01)),
    ]


def mixed_graders(n: int) -> list[grader_pb2.Grader]:
    """n graders cycling through the deterministic kinds, each named `<kind>_<index>`."""
    kinds = _grader_kinds()
    graders = []
    for i in range(n):
        g = grader_pb2.Grader()
        g.CopyFrom(kinds[i % len(kinds)])
        g.name = f"{g.WhichOneof('kind')}_{i}"
        graders.append(g)
    return graders


def large_run_request(items: int, graders: int, request_id: str = "") -> pb.CreateRunRequest:
    """The large run: `items` provided items x `graders` mixed graders."""
    return pb.CreateRunRequest(
        request_id=request_id,
        display_name=f"bench large {items}x{graders}",
        items=provided_items(items),
        target=PROVIDED,
        graders=mixed_graders(graders),
    )


def small_run_request(items: int = 10) -> pb.CreateRunRequest:
    """The unary scenario's CreateRun: `items` inline items, provided target, one exact_match grader."""
    return pb.CreateRunRequest(
        items=provided_items(items),
        target=PROVIDED,
        graders=[grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())],
    )


def cached_run_request(items: int, model_base_url: str) -> pb.CreateRunRequest:
    """The peers' workload through a chat target at `model_base_url` (`model_run_request`), reading
    and writing the response cache: run twice, the second makes no call."""
    return model_run_request(items, model_base_url, cache_pb2.CACHE_MODE_READ_WRITE)


def model_run_request(
    items: int, model_base_url: str, cache_mode: cache_pb2.CacheMode.ValueType = cache_pb2.CACHE_MODE_OFF
) -> pb.CreateRunRequest:
    """The peers' workload (items answered "answer i", one exact_match grader) through a chat target
    at `model_base_url`."""
    return pb.CreateRunRequest(
        display_name=f"bench model {items}",
        items=[item_pb2.Item(id=f"i{i}", input=f"answer {i}", expected_output=f"answer {i}") for i in range(items)],
        target=target_pb2.Target(
            chat=target_pb2.ChatTarget(endpoint=target_pb2.Endpoint(base_url=model_base_url), model="echo")
        ),
        graders=[grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch())],
        cache_mode=cache_mode,
    )


def pathological_run_request(items: int, numbers: int) -> pb.CreateRunRequest:
    """A run whose every output is a JSON array of `numbers` numbers (~6.5 bytes each) graded by
    similarity (quadratic in the text), JSON match and a regex: expensive but valid work that grading
    on the event loop would turn into seconds of stall per item."""
    expected = json.dumps(list(range(numbers)))
    run_items = [
        item_pb2.Item(
            id=f"big{i}",
            expected_output=expected,
            response=item_pb2.Response(content=json.dumps(list(range(i + 1, numbers + i + 1)))),
        )
        for i in range(items)
    ]
    G = grader_pb2
    return pb.CreateRunRequest(
        items=run_items,
        target=PROVIDED,
        graders=[
            G.Grader(name="similar", similarity=G.Similarity(threshold=0.5)),
            G.Grader(name="json", json_match=G.JsonMatch()),
            G.Grader(name="numbers", regex=G.Regex(pattern=r"^\[(\d+, )*\d+\]$")),
        ],
    )
