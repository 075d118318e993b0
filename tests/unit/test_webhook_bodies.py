"""Webhook bodies are written a piece at a time (evalsvc.webhooks.signing) and kept once per event
(evalsvc.webhooks.bodies): the text is json.dumps's, byte for byte, and the documented body's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from google.protobuf import json_format

from evalsvc.store.records import ClaimedDelivery
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import grader_pb2
from evalsvc.webhooks import bodies, signing


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "x",
        1.5,
        [],
        {},
        {"a": [1, 2.5, None, 'é\u2028"\\', {"x": []}] * 3000, "b": {}, "": True},
        [[1] * 5000, [{}] * 3000, list(range(signing.SPLIT_LEN * 2 + 1))],
        {"k": [*range(10_000), {"z": [float("nan"), 1e300]}]},
        {f"k{i}": [i, "v", True] for i in range(5000)},
        [[[[[[[[["deep"]]]]]]]]],
    ],
)
def test_the_pieces_are_json_dumps_byte_for_byte(value: Any) -> None:
    assert "".join(signing._pieces(value, signing.SPLIT_DEPTH)) == dumps(value)


def large_event(seq: int = 3) -> pb.WatchRunResponse:
    event = pb.WatchRunResponse(seq=seq)
    event.run.id = "run_x"
    event.event_time.FromSeconds(1_700_000_000)
    for g in range(3):
        values = [str(i % 10) for i in range(20_000)]
        event.run.graders.append(grader_pb2.Grader(name=f"c{g}", contains=grader_pb2.Contains(values=values)))
    return event


def test_a_body_is_the_documented_document() -> None:
    event = large_event()
    document = {
        "type": "run.succeeded",
        "timestamp": event.event_time.ToJsonString(),
        "data": {"run": json_format.MessageToDict(event.run), "lastSeq": str(event.seq)},
    }
    assert signing.body("run.succeeded", event) == dumps(document).encode()


def claimed(delivery_id: str, event: pb.WatchRunResponse, event_type: str = "run.succeeded") -> ClaimedDelivery:
    return ClaimedDelivery(
        id=delivery_id,
        tenant="t",
        webhook_id="wh_" + delivery_id,
        event_type=event_type,
        run_id=event.run.id,
        seq=event.seq,
        attempts=0,
        claim_id="c",
        url="http://127.0.0.1/",
        secret=b"k",
        previous_secret=None,
        previous_secret_expire_time=None,
        payload=event.SerializeToString(),
        probe=False,
    )


async def test_a_large_body_is_built_once_per_event_and_kept_within_its_bytes() -> None:
    first, second = large_event(3), large_event(4)
    size = len(signing.body("run.succeeded", first))
    kept = bodies.Bodies(cache_bytes=size + size // 2)  # room for one of them
    made = await asyncio.gather(*(kept.body(claimed(f"msg_{i}", first)) for i in range(5)))
    assert kept.built == 1 and len(set(made)) == 1 and made[0] == signing.body("run.succeeded", first)
    assert await kept.body(claimed("msg_retry", first)) == made[0] and kept.built == 1
    await kept.body(claimed("msg_other", second))
    assert kept.built == 2
    await kept.body(claimed("msg_again", first))  # forgotten for the second one: built again
    assert kept.built == 3
    await kept.body(claimed("msg_type", first, "run.failed"))  # another event type is another body
    assert kept.built == 4
