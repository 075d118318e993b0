"""`Slots`, the one counted-slot mechanism (worker slots, each endpoint's concurrency slots, the grading
processes): waiters are served round-robin across tenants, first come first served within one, and
cancellation never leaks a slot. No network, no server.

The random interleavings are seeded; replay a failure with EVALSVC_SLOTS_SEED=<seed>."""

from __future__ import annotations

import asyncio
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest

from evalsvc.slots import Hold, KeyedLocks, SharedSlots, Slots

SEEDS = [int(os.environ["EVALSVC_SLOTS_SEED"])] if "EVALSVC_SLOTS_SEED" in os.environ else list(range(40))
STEPS = 300
TENANTS = ["a", "b", "c", "d"]


async def settle() -> None:
    """Let every task woken by the last action run as far as it can (a grant passed on by a waiter
    cancelled as it was granted takes a few turns of the loop)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_free_slots_go_to_waiting_tenants_in_turn() -> None:
    """Tenant A queues four waiters, then tenant B one: B's goes second, not fifth."""
    slots = Slots(1)
    await slots.acquire("a")  # busy, so everything below waits
    order: list[str] = []

    async def holder(tenant: str, label: str) -> None:
        await slots.acquire(tenant)
        order.append(label)
        slots.release()

    waiting = [asyncio.create_task(holder("a", f"a{i}")) for i in range(4)]
    await asyncio.sleep(0)  # A's four are queued before B arrives
    waiting.append(asyncio.create_task(holder("b", "b0")))
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*waiting)
    assert order == ["a0", "b0", "a1", "a2", "a3"]


async def test_a_hold_takes_and_takes_again_in_its_tenants_turn() -> None:
    """A job's worker slot (`Hold`) is taken in its tenant's turn, the first time and again after it gave
    the slot back to wait on its endpoint: one tenant's jobs coming back from a wait queue behind
    another tenant's only as the rotation says."""
    slots = Slots(1)
    first = Hold(slots, "a")
    await first.take()
    order: list[str] = []

    async def job(tenant: str, label: str) -> None:
        hold = Hold(slots, tenant)
        await hold.take()
        order.append(label)
        hold.give_back()

    waiting = [asyncio.create_task(job("a", f"a{i}")) for i in range(3)]
    await asyncio.sleep(0)
    waiting.append(asyncio.create_task(job("b", "b0")))
    await asyncio.sleep(0)
    first.give_back()
    await asyncio.gather(*waiting)
    assert order == ["a0", "b0", "a1", "a2"]


async def test_waiters_of_one_key_are_served_first_come_first_served() -> None:
    """With one key the queue is FIFO."""
    slots = Slots(1)
    await slots.acquire()
    order: list[int] = []

    async def holder(i: int) -> None:
        await slots.acquire()
        order.append(i)
        slots.release()

    waiting = [asyncio.create_task(holder(i)) for i in range(5)]
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*waiting)
    assert order == [0, 1, 2, 3, 4]


async def test_a_cancelled_waiter_gives_up_its_place_without_losing_a_slot() -> None:
    slots = Slots(1)
    await slots.acquire("a")
    gone = asyncio.create_task(slots.acquire("b"))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert (slots.held, slots.waiting) == (1, 0)
    slots.release()
    await asyncio.wait_for(slots.acquire("c"), 5)  # the slot came back, not to the cancelled waiter
    assert (slots.held, slots.waiting) == (1, 0)


async def test_a_slot_granted_to_a_waiter_cancelled_at_that_moment_goes_to_the_next_tenant_in_turn() -> None:
    slots = Slots(1)
    await slots.acquire("a")
    order: list[str] = []

    async def holder(tenant: str, label: str) -> None:
        await slots.acquire(tenant)
        order.append(label)

    b0 = asyncio.create_task(holder("b", "b0"))
    c0 = asyncio.create_task(holder("c", "c0"))
    b1 = asyncio.create_task(holder("b", "b1"))
    await asyncio.sleep(0)
    slots.release()  # the slot goes to b0...
    b0.cancel()  # ...which is cancelled before it resumes: c0 is next in turn, then b1
    with pytest.raises(asyncio.CancelledError):
        await b0
    await asyncio.wait_for(c0, 5)
    assert (order, slots.held, slots.waiting) == (["c0"], 1, 1)
    slots.release()
    await asyncio.wait_for(b1, 5)
    assert (order, slots.held, slots.waiting) == (["c0", "b1"], 1, 0)


# ------------------------------------------------------------------------------------------ interleavings


@dataclass
class Grant:
    """One slot handed to a waiter by the reference model, and who was waiting just before."""

    label: str
    tenant: str
    waiting_before: frozenset[str]


@dataclass
class Model:
    """The specification, written plainly: capacity, holders, and per tenant a FIFO of waiters in a
    rotation; a freed slot goes to the first tenant of the rotation, which then moves to its end."""

    capacity: int
    held: int = 0
    rotation: OrderedDict[str, list[str]] = field(default_factory=OrderedDict)
    grants: list[Grant] = field(default_factory=list)
    just_granted: set[str] = field(default_factory=set)  # granted in this step; their tasks have not run yet

    def waiting(self) -> frozenset[str]:
        return frozenset(label for queue in self.rotation.values() for label in queue)

    def arrive(self, tenant: str, label: str) -> None:
        if self.held < self.capacity and not self.rotation:
            self.held += 1
            self.grants.append(Grant(label, tenant, self.waiting()))
        else:
            self.rotation.setdefault(tenant, []).append(label)

    def grant(self) -> None:
        while self.rotation and self.held < self.capacity:
            before = self.waiting()
            tenant, queue = next(iter(self.rotation.items()))
            label = queue.pop(0)
            if queue:
                self.rotation.move_to_end(tenant)
            else:
                del self.rotation[tenant]
            self.held += 1
            self.just_granted.add(label)
            self.grants.append(Grant(label, tenant, before))

    def release(self) -> None:
        self.held -= 1
        self.grant()

    def cancel(self, tenant: str, label: str) -> None:
        if label in self.just_granted:  # granted and cancelled at the same moment: the slot is passed on
            self.just_granted.discard(label)
            self.release()
            return
        queue = self.rotation[tenant]
        queue.remove(label)
        if not queue:
            del self.rotation[tenant]

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self.grant()


def check_round_robin(grants: list[Grant], tenant_of: dict[str, str], seed: int) -> None:
    """Implementation-free statements of fairness over the model's grants (which the real slots match):
    within a tenant, first come first served; and between two grants to one tenant, every other tenant
    that had a waiter waiting all along was granted one."""
    for tenant in TENANTS:
        labels = [g.label for g in grants if g.tenant == tenant]
        assert labels == sorted(labels, key=lambda label: int(label.split("-")[1])), (seed, tenant, labels)
    last: dict[str, int] = {}
    for i, grant in enumerate(grants):
        if grant.tenant in last:
            j = last[grant.tenant]
            served_between = {g.tenant for g in grants[j + 1 : i]}
            for label in grants[j].waiting_before & grant.waiting_before:
                other = tenant_of[label]
                assert other == grant.tenant or other in served_between, (
                    f"seed {seed}: tenant {grant.tenant} was granted twice (grants {j} and {i}) while "
                    f"{label} of tenant {other} waited throughout"
                )
        last[grant.tenant] = i


async def interleave(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.randint(1, 3)
    slots, model = Slots(capacity), Model(capacity)
    tasks: dict[str, asyncio.Task[None]] = {}
    tenant_of: dict[str, str] = {}
    served: list[str] = []  # in the order their acquire returned
    holders: list[str] = []
    waiting: set[str] = set()  # arrived, not yet served, not cancelled
    cancelled: set[str] = set()

    async def waiter(tenant: str, label: str) -> None:
        await slots.acquire(tenant)
        served.append(label)
        holders.append(label)
        waiting.discard(label)

    def cancel(label: str) -> None:
        waiting.discard(label)
        cancelled.add(label)
        tasks[label].cancel()
        model.cancel(tenant_of[label], label)

    def release() -> None:
        holders.remove(rng.choice(holders))
        slots.release()
        model.release()

    for step in range(STEPS):
        action = rng.choices(
            ["arrive", "release", "cancel", "release, then cancel", "cancel, then release", "capacity"],
            weights=[5, 3, 2, 1, 1, 1],
        )[0]
        if action == "arrive":
            tenant = rng.choices(TENANTS, weights=[6, 2, 1, 1])[0]  # one tenant with most of the load
            label = f"{tenant}-{step}"
            tenant_of[label] = tenant
            waiting.add(label)
            tasks[label] = asyncio.create_task(waiter(tenant, label))
            model.arrive(tenant, label)
        elif action == "release" and holders:
            release()
        elif action == "cancel" and waiting:
            cancel(rng.choice(sorted(waiting)))
        elif action == "release, then cancel" and holders and waiting:
            release()  # the slot may go to the very waiter cancelled next: it must pass it on
            cancel(rng.choice(sorted(waiting)))
        elif action == "cancel, then release" and holders and waiting:
            cancel(rng.choice(sorted(waiting)))  # cancelled, not yet out of the queue when the slot frees
            release()
        elif action == "capacity":  # an endpoint's adaptive limit halving or growing
            capacity = rng.randint(1, 4)
            slots.set_capacity(capacity)
            model.set_capacity(capacity)
        await settle()
        model.just_granted.clear()
        expected = [g.label for g in model.grants if g.label not in cancelled]
        note = f"seed {seed}, step {step} ({action})"
        assert served == expected, note
        assert slots.held == model.held == len(holders), note  # no slot leaked, none handed out twice
        assert slots.waiting == len(model.waiting()) == len(waiting), note

    while holders or waiting:  # drain: every waiter not cancelled is served
        slots.set_capacity(max(capacity, 1))
        if holders:
            holders.pop()
            slots.release()
        await settle()
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    for label, result in zip(tasks, results, strict=True):
        if label in cancelled:
            assert isinstance(result, asyncio.CancelledError), (seed, label, result)
        else:
            assert result is None and label in served, (seed, label, result)
    assert (slots.held, slots.waiting, slots.available()) == (0, 0, True), seed
    check_round_robin(model.grants, tenant_of, seed)


async def test_random_interleavings_leak_no_slot_and_serve_tenants_in_turn() -> None:
    """Waiters of four tenants (one with most of the load) arrive, are cancelled (also in the instant
    they are granted a slot, and just before one frees), slots are released in random order and the
    capacity changes (an adaptive limit). After every step the slots match a plain model of the
    round-robin: the same waiters served in the same order, as many slots held and waiting; no slot is
    leaked or handed out twice, every waiter not cancelled is served in the end, and the order is fair
    (check_round_robin)."""
    for seed in SEEDS:
        await interleave(seed)


async def test_shared_slots_keep_a_key_to_half_while_another_uses_them() -> None:
    """`SharedSlots` (an endpoint's): alone a key takes every slot; while another key holds, waits for or
    recently took one, it holds at most half, and the slots it may not take stay free for the others."""
    slots = SharedSlots(4, window_s=60)
    await slots.acquire("b")
    slots.release("b")  # B took one a moment ago
    for _ in range(2):
        await slots.acquire("a")
    third = asyncio.create_task(slots.acquire("a"))
    await settle()
    assert not third.done() and slots.held == 2 and slots.available("b")
    await slots.acquire("b")  # at once, though A waits: A is at its share
    assert not third.done()
    slots.release("a")  # A below its share again: its waiter takes the slot
    await settle()
    assert third.done() and slots.held_by("a") == 2 and slots.held_by("b") == 1
    for key in ("a", "a", "b"):
        slots.release(key)
    slots.window_s = 0.0  # B's use is long ago: A alone takes every slot
    for _ in range(4):
        await asyncio.wait_for(slots.acquire("a"), 1)
    assert slots.held_by("a") == 4 and not slots.available("a")


async def test_shared_slots_lend_a_newcomer_what_a_tenant_took_alone_beyond_its_share() -> None:
    """A tenant alone on an endpoint took every slot; on a hanging endpoint its calls end only at their
    timeout, and a newcomer waited for that (57 s behind the default judge, a probe measured). The slots
    held beyond the share are lent to the newcomer on top of the capacity at once, up to its own share,
    and the first tenant's ending calls are not replaced while the total is over the capacity."""
    slots = SharedSlots(4, window_s=60)
    for _ in range(4):
        await asyncio.wait_for(slots.acquire("a"), 1)  # alone: every slot
    for _ in range(2):
        await asyncio.wait_for(slots.acquire("b"), 1)  # at once, though none is free: A's two over its share
    assert slots.held == 6 and slots.held_by("b") == 2
    third_b = asyncio.create_task(slots.acquire("b"))  # beyond B's share: waits
    more_a = asyncio.create_task(slots.acquire("a"))  # A is over its share while B uses the slots: waits
    await settle()
    assert not third_b.done() and not more_a.done()
    slots.release("a")
    slots.release("a")  # A back at its share: nothing lent, nothing free (2 + 2 of 4)
    await settle()
    assert slots.held == 4 and not third_b.done() and not more_a.done()
    slots.release("b")  # B below its share: its waiter takes the freed slot (A is at its share)
    await settle()
    assert third_b.done() and not more_a.done() and slots.held == 4
    more_a.cancel()
    for key in ("a", "a", "b", "b"):
        slots.release(key)
    assert slots.held == 0


async def test_shared_slots_lend_nothing_past_a_lowered_capacity() -> None:
    """A throttling endpoint halves its limit: what the first tenant holds past the new capacity is not
    lent (a review: limit 16 -> 8 with 16 held, and B still took 4 at once, 20 calls on an endpoint that
    had just said 429)."""
    slots = SharedSlots(16, window_s=60)
    for _ in range(16):
        await asyncio.wait_for(slots.acquire("a"), 1)
    slots.set_capacity(8)  # share 4: A holds 12 beyond it, but only 4 of them within the capacity
    b = asyncio.create_task(slots.acquire("b"))
    await settle()
    assert not b.done() and not slots.available("b")
    for _ in range(4):
        slots.release("a")  # 12 held: the 4 A holds past its share within the capacity are lent from here
    await settle()
    assert not b.done() and slots.held == 12
    slots.release("a")  # 11 held, under 8 + 4
    await settle()
    assert b.done() and slots.held == 12 and slots.held_by("b") == 1


async def test_shared_slots_random_interleavings_leak_nothing_and_stay_bounded() -> None:
    """Seeded random acquires, cancellations and releases by four keys (one flooding) on `SharedSlots`,
    with its window on and off and the capacity changing: after every step the count matches the holders,
    no slot is granted past twice the current capacity (the lent slots; a lowered capacity lends only
    what fits in it), no waiter is left waiting that could take a slot,
    and once every holder releases, every waiter not cancelled has been served and nothing is held."""
    for seed in SEEDS:
        rng = random.Random(seed)
        slots = SharedSlots(rng.randint(1, 6), window_s=rng.choice([0.0, 60.0]))
        holding: list[str] = []
        waiting: list[tuple[str, asyncio.Task[None]]] = []
        for _ in range(STEPS):
            before = slots.held
            roll = rng.random()
            if roll < 0.5:
                key = "a" if rng.random() < 0.6 else rng.choice(TENANTS)
                waiting.append((key, asyncio.create_task(slots.acquire(key))))
            elif roll < 0.8 and holding:
                slots.release(holding.pop(rng.randrange(len(holding))))
            elif roll < 0.9 and waiting:
                waiting.pop(rng.randrange(len(waiting)))[1].cancel()
            else:
                slots.set_capacity(rng.randint(1, 6))
            await settle()
            holding += [key for key, task in waiting if task.done() and not task.cancelled()]
            waiting = [(key, task) for key, task in waiting if not task.done()]
            assert slots.held == len(holding) == sum(slots.held_by(k) for k in TENANTS), seed
            assert slots.held <= before or slots.held <= 2 * slots.capacity, seed  # no grant past twice it
            assert not waiting or slots._next_key() is None, seed  # nobody waits who could take a slot
        while holding or waiting:
            if holding:
                slots.release(holding.pop())
            await settle()
            holding += [key for key, task in waiting if task.done() and not task.cancelled()]
            waiting = [(key, task) for key, task in waiting if not task.done()]
        assert slots.held == 0 and slots.waiting == 0, seed


async def test_keyed_locks_hold_one_per_key_and_forget_keys_nobody_holds() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    first_in, release_first = asyncio.Event(), asyncio.Event()

    async def holder(key: str, name: str, gate: asyncio.Event | None = None) -> None:
        async with locks.hold(key):
            order.append(name)
            if gate is not None:
                first_in.set()
                await gate.wait()

    first = asyncio.ensure_future(holder("a", "a1", release_first))
    await first_in.wait()
    second = asyncio.ensure_future(holder("a", "a2"))
    cancelled = asyncio.ensure_future(holder("a", "a3"))
    other = asyncio.ensure_future(holder("b", "b1"))
    await other  # another key does not wait
    await asyncio.sleep(0)
    cancelled.cancel()  # a waiter that goes away leaves nothing behind
    assert order == ["a1", "b1"] and len(locks) == 1
    release_first.set()
    await asyncio.gather(first, second, return_exceptions=True)
    assert order == ["a1", "b1", "a2"]
    assert len(locks) == 0
