"""The in-process event bus: bounded buffers, fan-out per run, and the ways a watch ends."""

from __future__ import annotations

import grpc
import pytest

from evalsvc.errors import ServiceError
from evalsvc.events.bus import EventBus, Subscription
from evalsvc.v1 import eval_run_service_pb2 as pb


def events(*seqs: int) -> list[pb.WatchRunResponse]:
    return [pb.WatchRunResponse(seq=seq) for seq in seqs]


def push(subscription: Subscription, batch: list[pb.WatchRunResponse] | None) -> None:
    """As EventBus.publish pushes: with the batch's serialized size."""
    subscription.push(batch, 0 if batch is None else sum(event.ByteSize() for event in batch))


def run_event(seq: int, definition_bytes: int) -> pb.WatchRunResponse:
    """A run event whose run carries a definition of about `definition_bytes` (every run event repeats it)."""
    event = pb.WatchRunResponse(seq=seq)
    event.run.id = "run_a"
    event.run.description = "x" * definition_bytes
    return event


async def test_a_batch_larger_than_the_buffer_reaches_a_watcher_that_keeps_up() -> None:
    subscription = Subscription(capacity=8)
    batch = events(*range(1, 21))
    push(subscription, batch)  # empty buffer: taken whole
    assert await subscription.next(1.0) == batch
    push(subscription, batch)
    push(subscription, events(21))  # behind 20 unread events in 8 slots: overflow
    assert await subscription.next(1.0) is None  # read the database instead


async def test_a_watcher_that_stopped_reading_holds_a_bounded_number_of_bytes_not_run_events() -> None:
    # 8 events' room is 1 KiB: a second multi-KB run event behind an unread one sends the watcher to the
    # database (by count alone it held --watch-buffer run events, each the size of the run's definition).
    bus = EventBus()
    with bus.subscribe("run_a", 8) as subscription:
        bus.publish("run_a", [run_event(1, 5000)])  # an empty buffer takes it, whatever its size
        bus.publish("run_a", [run_event(2, 5000)])
        assert await subscription.next(1.0) is None
        bus.publish("run_a", events(3, 4, 5))  # small events within the bounds still buffer
        bus.publish("run_a", events(6))
        assert await subscription.next(1.0) == events(3, 4, 5, 6)
        bus.publish("run_a", events(7))
        bus.publish("run_a", [run_event(8, 900)])  # 1 small + 1 under 1 KiB: within the bytes too
        assert [event.seq for event in await subscription.next(1.0)] == [7, 8]


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
