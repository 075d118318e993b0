"""The in-process event bus: bounded buffers, fan-out per run, and the ways a watch ends."""

from __future__ import annotations

import grpc
import pytest

from evalsvc.errors import ServiceError
from evalsvc.events.bus import EventBus, Subscription, _size_within
from evalsvc.v1 import eval_run_service_pb2 as pb


def events(*seqs: int) -> list[pb.WatchRunResponse]:
    return [pb.WatchRunResponse(seq=seq) for seq in seqs]


def push(subscription: Subscription, batch: list[pb.WatchRunResponse] | None) -> None:
    """As EventBus.publish pushes: with the batch's serialized size."""
    subscription.push(batch, 0 if batch is None else sum(event.ByteSize() for event in batch))


def result_event(seq: int, output_bytes: int) -> pb.WatchRunResponse:
    """A result event whose output is about `output_bytes` (a target's answer can be megabytes)."""
    event = pb.WatchRunResponse(seq=seq)
    event.result.output.content = "x" * output_bytes
    return event


async def test_a_batch_larger_than_the_buffer_reaches_a_watcher_that_keeps_up() -> None:
    subscription = Subscription(capacity=8)
    batch = events(*range(1, 21))
    push(subscription, batch)  # empty buffer: taken whole
    assert await subscription.next(1.0) == batch
    push(subscription, batch)
    push(subscription, events(21))  # behind 20 unread events in 8 slots: overflow
    assert await subscription.next(1.0) is None  # read the database instead


async def test_a_watcher_that_stopped_reading_holds_a_bounded_number_of_bytes_not_of_events() -> None:
    # 8 events' room is 1 KiB: a second multi-KB result event behind an unread one sends the watcher to
    # the database (by count alone it held --watch-buffer events, each as large as its output).
    bus = EventBus()
    with bus.subscribe("run_a", 8) as subscription:
        bus.publish("run_a", [result_event(1, 5000)])  # an empty buffer takes it, whatever its size
        bus.publish("run_a", [result_event(2, 5000)])
        assert await subscription.next(1.0) is None
        bus.publish("run_a", events(3, 4, 5))  # small events within the bounds still buffer: the
        bus.publish("run_a", events(6))  # overflowed batch's bytes are not counted any more
        assert await subscription.next(1.0) == events(3, 4, 5, 6)
        bus.publish("run_a", events(7))
        bus.publish("run_a", [result_event(8, 900)])  # 1 small + 1 under 1 KiB: within the bytes too
        assert [event.seq for event in await subscription.next(1.0)] == [7, 8]


async def test_after_a_database_read_the_buffer_counts_its_bytes_from_nothing() -> None:
    subscription = Subscription(capacity=8)
    push(subscription, [result_event(1, 5000)])
    push(subscription, [result_event(2, 5000)])  # overflow: the database instead
    push(subscription, [result_event(3, 5000)])  # taken, then dropped with the database read
    assert await subscription.next(1.0) is None
    push(subscription, events(4))
    push(subscription, events(5))  # the dropped batch's bytes no longer count
    assert await subscription.next(1.0) == events(4, 5)


def test_a_batch_is_measured_only_as_far_as_a_buffer_could_take() -> None:
    batch = [result_event(seq, 1000) for seq in range(1, 1001)]
    assert _size_within(batch, 10**9) == sum(event.ByteSize() for event in batch)
    assert 2048 < _size_within(batch, 2048) < 2048 + 1100  # stopped at the first event past the limit


async def test_buffered_events_come_out_together_in_order_and_the_buffer_starts_over() -> None:
    subscription = Subscription(capacity=8)
    push(subscription, events(1, 2))
    push(subscription, events(3))
    assert await subscription.next(1.0) == events(1, 2, 3)
    push(subscription, events(4))
    assert await subscription.next(1.0) == events(4)


async def test_a_bare_wake_up_sends_the_watcher_to_the_database_once() -> None:
    subscription = Subscription(capacity=8)
    push(subscription, events(1))
    push(subscription, None)  # what was buffered is dropped with it: the database has it
    assert await subscription.next(1.0) is None
    push(subscription, events(2))
    assert await subscription.next(1.0) == events(2)


async def test_next_times_out_when_nothing_arrives() -> None:
    with pytest.raises(TimeoutError):
        await Subscription(capacity=8).next(0.01)


async def test_publish_reaches_every_watcher_of_the_run_and_no_other() -> None:
    bus = EventBus()
    with bus.subscribe("run_a", 8) as first, bus.subscribe("run_a", 8) as second, bus.subscribe("run_b", 8) as other:
        assert bus.has_watchers("run_a") and bus.watcher_count() == 3
        bus.publish("run_a", events(1))
        bus.publish("run_c", events(1))  # nobody watches it: dropped
        assert await first.next(1.0) == events(1) and await second.next(1.0) == events(1)
        with pytest.raises(TimeoutError):
            await other.next(0.01)
    assert not bus.has_watchers("run_a") and bus.watcher_count() == 0


async def test_wake_all_sends_every_watcher_to_the_database() -> None:
    bus = EventBus()
    with bus.subscribe("run_a", 8) as a, bus.subscribe("run_b", 8) as b:
        bus.wake_all()
        assert await a.next(1.0) is None and await b.next(1.0) is None


async def test_close_ends_every_watch_with_unavailable_and_refuses_new_ones() -> None:
    bus = EventBus()
    with bus.subscribe("run_a", 8) as subscription:
        push(subscription, events(1))  # a closed watch ends even with events unread
        bus.close()
        with pytest.raises(ServiceError) as ended:
            await subscription.next(1.0)
        assert (ended.value.code, ended.value.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
    with pytest.raises(ServiceError) as refused, bus.subscribe("run_a", 8):
        pass
    assert refused.value.reason == "SERVER_SHUTTING_DOWN"


async def test_close_owner_ends_only_that_keys_watches_with_its_error() -> None:
    bus = EventBus()
    revoked = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED", "the API key was revoked")
    with (
        bus.subscribe("run_a", 8, owner="k1") as mine,
        bus.subscribe("run_b", 8, owner="k1") as also_mine,
        bus.subscribe("run_a", 8, owner="k2") as theirs,
        bus.subscribe("run_a", 8) as anonymous,
    ):
        assert sorted(bus.owners()) == ["k1", "k2"]
        assert bus.close_owner("k1", revoked) == 2
        assert bus.close_owner("nobody", revoked) == 0
        for subscription in (mine, also_mine):
            with pytest.raises(ServiceError) as ended:
                subscription.raise_if_closed()
            assert ended.value is revoked
        theirs.raise_if_closed()
        anonymous.raise_if_closed()
        bus.publish("run_a", events(1))
        assert await theirs.next(1.0) == events(1)
    assert bus.owners() == []
