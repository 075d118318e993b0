"""Comparing two runs: pair their evaluations, compute the paired statistics, list the pairs side by side.

A pair is one evaluation key (item id, repetition, grader name) present in both runs; it counts when
neither side is ERROR or SKIPPED, both runs hold the same item under that id (`item_digests`) and the grader
has the same definition in both (`definition_digest`). Keys are only names: inline items are numbered
item-1, item-2... by position, and a grader keeps its name when its definition changes, so two runs of
different questions, or of one output graded two ways, paired on keys alone and got confident verdicts.
The statistics are computed here, from the stored results,
by evalsvc.runs.compare_stats; docs/compare.md describes them. CompareRuns pairs both runs whole: one
comparison at a time, taken by tenants in turn, and the turn is taken before either run is read. In its
turn a comparison reads both runs in key order, PAIRING_CHUNK keys of each at a time, and pairs each
chunk in a worker thread (`Pairing`): what it holds is two chunks, never a run. Each comparison used to
read both runs whole before it queued: 8 comparisons of two 400,000-evaluation runs grew the server by
1.6 GB and stalled every tenant's GetRun. A thread holds Python's one lock while it pairs, and four
pairings of two 100,000-evaluation runs side by side left the event loop (every other tenant's calls)
a fraction of it, up to a second per GetRun.

ListComparisonItems pairs only what its page needs: each run's next keys after the page token's key,
read as ordered index ranges, merged in key order (`_page_keys`) and classified as CompareRuns counts them
(`classify`: a pair of different items, or of a changed grader, is UNPAIRED in both), in no pairing slot. A
page costs the keys it returns (plus, with a `change` filter, the keys it passes over), not the runs'
sizes: with two 100,000-evaluation runs, a 100-key page costs ~16 ms on SQLite and ~20 ms on PostgreSQL
(`python -m bench.compare_digests --page-only`; its results read by id, store.comparisons `results_by_id`:
98 and 377 ms read by their keys); ~0.9 s and ~1.0 s when every page paired both runs whole. It
reads the stored digests of those keys' items (`_chunk_digests`); a run created before revision 0028
has none, and its page reads and hashes the items behind its keys: a page of large items costs their size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import FieldViolation, invalid_argument, not_found
from evalsvc.graders import grader_name
from evalsvc.graders.canonical import canonical_grader
from evalsvc.ids import PageTokens, page_size
from evalsvc.messages import canonical
from evalsvc.runs.compare_stats import PairedSummary, PairTally, summarize
from evalsvc.runs.outputs import FRAMING, attach_output, listed_size, side_shares
from evalsvc.slots import Slots
from evalsvc.statuses import ACTIVE
from evalsvc.store import comparisons as comparison_store
from evalsvc.store import runs as run_store
from evalsvc.store.comparisons import Evaluation, Key
from evalsvc.store.db import Database
from evalsvc.store.records import ResultRecord
from evalsvc.store.runs import StoredSizes
from evalsvc.store.staging import ItemDigests
from evalsvc.targets import sends_item_metadata
from evalsvc.turns import Turns
from evalsvc.v1 import comparison_pb2 as cpb
from evalsvc.v1 import grader_pb2, item_pb2, run_pb2

T = TypeVar("T")
DEFAULT_ALPHA = 0.05
# The smallest alpha: below it 1 - alpha/2 rounds to 1 in floating point (1e-17 raised StatisticsError,
# an INTERNAL), and from ~1e-15 the intervals lose their precision.
MIN_ALPHA = 1e-9
_GRADED = (run_pb2.RESULT_STATE_PASSED, run_pb2.RESULT_STATE_FAILED)
# The most keys of each run one read of a ListComparisonItems page takes while a `change` filter
# passes over keys: reads start at the page's size and double up to this, so a sparse filter costs
# few reads and a dense one reads little more than its page.
MAX_CHUNK = 4096
# Keys of each run a CompareRuns reads and pairs at a time: what one comparison holds (two chunks of
# ~100-byte tuples, a few MB), whatever its runs' sizes.
PAIRING_CHUNK = 10_000
FILTERED_PAGES = 2  # ListComparisonItems pages with a `change` filter read at once, per server
Side = tuple[int, float]  # state, score
# Item fields that reach neither the target nor the graders' scores, left out of `item_digests`: the id is
# the key itself, a recorded response is the output (what a comparison of `provided` runs compares),
# human verdicts only measure agreement. Metadata too, unless a target of the comparison is sent it
# (`sends_item_metadata`: a webhook is, and may answer by it). Every other field, a field added later
# too, makes two items differ. Stored digests carry no version: a change here, or in how `item_digests`
# serializes, must come with a migration that clears run_items' digests (tests/unit/test_compare_digests.py
# pins them), or old runs compare as of different items.
_UNCOMPARED_ITEM_FIELDS = ("id", "response", "human_verdicts")
# Grader fields that do not change a grader's own results, left out of `definition_digest`: the name is
# the key (spelled out or defaulted to the kind), the weight only weighs the item score.
_UNCOMPARED_GRADER_FIELDS = ("name", "weight")
# Item bytes hashed in about the time of one small item (~6 us): the parts `digests_of` counts an item for.
_BYTES_PER_PART = 1024


def item_digests(raw: bytes) -> ItemDigests:
    """The digests of a stored item as a comparison sees it: equal for two items only when what reaches
    the target and the graders is the same (`_UNCOMPARED_ITEM_FIELDS` aside), with its metadata and
    without (compared only when either run's target is sent it, `metadata_compared`). CreateRun stores
    them with the item (models.RunItemRow); a comparison hashes the items of runs stored before them, so
    both must come from here."""
    item = item_pb2.Item.FromString(raw)
    for field in _UNCOMPARED_ITEM_FIELDS:
        item.ClearField(field)
    with_metadata = hashlib.sha256(item.SerializeToString(deterministic=True)).digest()
    item.ClearField("metadata")
    return ItemDigests(with_metadata, hashlib.sha256(item.SerializeToString(deterministic=True)).digest())


async def digests_of(items: Sequence[bytes]) -> list[ItemDigests]:
    """Each item's digests (`item_digests`), for CreateRun to store with them, in turns (evalsvc.turns)
    weighed by the items' sizes: ~6 us a small item, ~6 ms a MB. Counted one part an item, the clock was
    read every 64 items: 70 items of 10,000 conversation turns (17 MB) held the event loop 80-105 ms
    at a stretch; weighed, 6-10 ms (one item is hashed whole: at that rate a 4 MB item holds it ~25 ms)."""
    turns = Turns()
    digests: list[ItemDigests] = []
    for raw in items:
        digests.append(item_digests(raw))
        await turns.tick(1 + len(raw) // _BYTES_PER_PART)
    return digests


def _digest_batch(items: Sequence[tuple[str, bytes]]) -> dict[str, ItemDigests]:
    return {item_id: item_digests(raw) for item_id, raw in items}


def metadata_compared(baseline: run_pb2.Run, candidate: run_pb2.Run) -> bool:
    """Whether items differing in metadata alone differ for this comparison: when either run's target is
    sent the items' metadata (a webhook: it reached the target, and may have changed its answer)."""
    return sends_item_metadata(baseline.target) or sends_item_metadata(candidate.target)


def definition_digest(grader: grader_pb2.Grader, default_model: str) -> str:
    """The digest of a grader's canonical form (`canonical_grader`: defaults filled in, unused settings left
    out), `_UNCOMPARED_GRADER_FIELDS` aside: equal in two runs only when the grader scores an output the
    same way in both. `default_model` stands for an empty judge model (`judged_by_default`)."""
    material = canonical.definition(canonical_grader(grader, default_model))
    for field in _UNCOMPARED_GRADER_FIELDS:
        material.pop(field, None)
    return canonical.digest(material)


def judged_by_default(run: run_pb2.Run, default_model: str) -> str:
    """The model a run's judges without a model were graded by: the default it recorded at creation, or for
    a run created before runs recorded it, `default_model` (this server's --judge-model: such a run is taken
    as graded by today's default)."""
    return run.default_judge_model or default_model


def changed_definitions(baseline: run_pb2.Run, candidate: run_pb2.Run, default_model: str) -> frozenset[str]:
    """The grader names both runs have whose definitions differ (saved graders are stored resolved)."""
    old, new = judged_by_default(baseline, default_model), judged_by_default(candidate, default_model)
    before = {grader_name(g): definition_digest(g, old) for g in baseline.graders}
    after = {grader_name(g): definition_digest(g, new) for g in candidate.graders}
    return frozenset(name for name, digest in after.items() if before.get(name, digest) != digest)


class Classified(NamedTuple):
    """How one evaluation changed, and why it is UNPAIRED when it is (UNSPECIFIED when it is a pair)."""

    change: cpb.ComparisonChange
    unpaired_reason: cpb.UnpairedReason


def classify(
    baseline: Side | None, candidate: Side | None, same_item: bool = True, definition_changed: bool = False
) -> Classified:
    """How one evaluation key changed, as CompareRuns counts it and ListComparisonItems lists it (one
    classification, so a `change` filter lists what CompareRuns counted): UNPAIRED when a side is missing,
    the runs hold different items under its item id (`same_item` false), its grader's definition changed,
    or a side could not be graded; in that order, so ITEM_CHANGED keys are RunComparison.changed_items."""
    unpaired = cpb.COMPARISON_CHANGE_UNPAIRED
    if baseline is None or candidate is None:
        return Classified(unpaired, cpb.UNPAIRED_REASON_ONE_RUN)
    if not same_item:
        return Classified(unpaired, cpb.UNPAIRED_REASON_ITEM_CHANGED)
    if definition_changed:
        return Classified(unpaired, cpb.UNPAIRED_REASON_DEFINITION_CHANGED)
    if baseline[0] not in _GRADED or candidate[0] not in _GRADED:
        return Classified(unpaired, cpb.UNPAIRED_REASON_NOT_GRADED)
    base_passed = baseline[0] == run_pb2.RESULT_STATE_PASSED
    cand_passed = candidate[0] == run_pb2.RESULT_STATE_PASSED
    if base_passed and cand_passed:
        change = cpb.COMPARISON_CHANGE_BOTH_PASSED
    elif base_passed:
        change = cpb.COMPARISON_CHANGE_REGRESSED
    elif cand_passed:
        change = cpb.COMPARISON_CHANGE_IMPROVED
    else:
        change = cpb.COMPARISON_CHANGE_BOTH_FAILED
    return Classified(change, cpb.UNPAIRED_REASON_UNSPECIFIED)


def _by_key(rows: Iterable[Evaluation]) -> dict[Key, tuple[Side, int]]:
    """Each evaluation's side and result id, by key."""
    return {
        (item_id, rep, grader): ((state, score), result_id) for item_id, rep, grader, state, score, result_id in rows
    }


def verdict_of(pairs: int, summary: PairedSummary) -> cpb.ComparisonVerdict:
    """The verdict on a tally: NO_PAIRS without pairs, whose 0% rates and p of 1 read as "no change" (two
    runs sharing no grader name passed a regression gate), else what the test concludes."""
    if not pairs:
        return cpb.COMPARISON_VERDICT_NO_PAIRS
    if summary.regressed:
        return cpb.COMPARISON_VERDICT_REGRESSED
    if summary.improved:
        return cpb.COMPARISON_VERDICT_IMPROVED
    return cpb.COMPARISON_VERDICT_NO_SIGNIFICANT_CHANGE


def _grader_comparison(
    name: str, tally: PairTally, unpaired: int, alpha: float, definition_changed: bool = False
) -> cpb.GraderComparison:
    summary = summarize(tally, alpha)
    return cpb.GraderComparison(
        grader=name,
        pairs=tally.pairs,
        both_passed=tally.both_passed,
        both_failed=tally.both_failed,
        regressed=tally.regressed,
        improved=tally.improved,
        unpaired=unpaired,
        baseline_pass_rate=summary.baseline_pass_rate,
        candidate_pass_rate=summary.candidate_pass_rate,
        pass_rate_delta=summary.pass_rate_delta,
        delta_ci_low=summary.delta_ci[0],
        delta_ci_high=summary.delta_ci[1],
        mcnemar_p_value=summary.mcnemar_p_value,
        mean_score_delta=summary.mean_score_delta,
        score_delta_ci_low=summary.score_delta_ci[0],
        score_delta_ci_high=summary.score_delta_ci[1],
        verdict=verdict_of(tally.pairs, summary),
        baseline_mean_score=summary.baseline_mean_score,
        candidate_mean_score=summary.candidate_mean_score,
        definition_changed=definition_changed,
    )


class Pairing:
    """The tallies of a comparison, fed both runs' evaluations in key order, a chunk at a time
    (`merge`), so what it holds is a few chunks (and their items' digests), never a run.

    A key whose item differs between the runs is no pair (`changed_items`), nor is any evaluation of a
    grader in `changed`: both count as unpaired, so their graders' verdicts rest on real pairs only, or
    are NO_PAIRS."""

    def __init__(self, grader_order: Sequence[str], changed: frozenset[str] = frozenset()) -> None:
        self.grader_order = list(grader_order)
        self.changed = changed
        self.tallies: dict[str, PairTally] = {name: PairTally() for name in grader_order}
        self.unpaired: dict[str, int] = dict.fromkeys(grader_order, 0)
        self.overall = PairTally()
        self.changed_items = 0

    def _pair(self, grader: str, b: Side | None, c: Side | None, same_item: bool) -> None:
        tally = self.tallies.setdefault(grader, PairTally())
        self.unpaired.setdefault(grader, 0)
        change, reason = classify(b, c, same_item, grader in self.changed)
        if reason == cpb.UNPAIRED_REASON_ITEM_CHANGED:
            self.changed_items += 1
        if change == cpb.COMPARISON_CHANGE_UNPAIRED:
            self.unpaired[grader] += 1
            return
        assert b is not None and c is not None
        for target in (tally, self.overall):
            target.add(b[0] == run_pb2.RESULT_STATE_PASSED, c[0] == run_pb2.RESULT_STATE_PASSED, b[1], c[1])

    def merge(
        self,
        baseline: Sequence[Evaluation],
        candidate: Sequence[Evaluation],
        bound: Key | None,
        items: tuple[Mapping[str, bytes], Mapping[str, bytes]],
    ) -> tuple[list[Evaluation], list[Evaluation]]:
        """Pair the evaluations of both (key-ordered) chunks with keys up to `bound` (all of them when
        None: both runs are read to their end); what is past it is returned, to merge with the next chunks.
        `items` holds each run's item digests (`_chunk_digests`) by item id, for the items of its chunk."""
        i = j = 0
        while True:
            kb = baseline[i][:3] if i < len(baseline) else None
            kc = candidate[j][:3] if j < len(candidate) else None
            if kb is None and kc is None:
                break
            if kb is not None and (kc is None or kb <= kc):
                key = kb
            else:
                assert kc is not None
                key = kc
            if bound is not None and key > bound:
                break
            b: Side | None = None
            c: Side | None = None
            if kb == key:
                b = (baseline[i][3], baseline[i][4])
                i += 1
            if kc == key:
                c = (candidate[j][3], candidate[j][4])
                j += 1
            self._pair(key[2], b, c, items[0].get(key[0]) == items[1].get(key[0]))
        return list(baseline[i:]), list(candidate[j:])

    def result(self, alpha: float) -> tuple[list[cpb.GraderComparison], cpb.GraderComparison]:
        """Per-grader comparisons (in the grader order given, then any other grader by name) and the overall one."""
        ordered = self.grader_order + sorted(set(self.tallies) - set(self.grader_order))
        per_grader = [
            _grader_comparison(name, self.tallies[name], self.unpaired[name], alpha, name in self.changed)
            for name in ordered
        ]
        return per_grader, _grader_comparison("", self.overall, sum(self.unpaired.values()), alpha)


async def _finished(thread: Coroutine[Any, Any, T]) -> T:
    """What `thread` (an asyncio.to_thread) returns; a cancelled caller still waits for the thread to end
    before the CancelledError leaves, so a comparison whose caller left keeps its turn (`_turn`) until its
    merge is over: a thread cannot be stopped, and the next comparison's merge would run beside it."""
    work = asyncio.ensure_future(thread)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still the thread runs
                await asyncio.wait([work])
        if not work.cancelled():
            work.exception()  # retrieved: the caller left, what the merge gave is of no use
        raise


async def _chunk_digests(
    conn: AsyncConnection, tenant: str, run_id: str, chunk: Sequence[Evaluation], with_metadata: bool
) -> dict[str, bytes]:
    """The digests of the items of a chunk of a run's evaluations (its item ids are a range: the chunk is
    in key order), by item id, with their metadata or without (`metadata_compared`). Those stored with the
    items are read; the items of a run stored before them (revision 0028) are read a batch at a time and
    hashed in a worker thread, by the function that stored the others (`item_digests`), so an old run
    pairs with a new one as two new runs do."""
    if not chunk:
        return {}
    digests, undigested = await comparison_store.item_digests_between(conn, tenant, run_id, chunk[0][0], chunk[-1][0])
    batches = comparison_store.undigested_items(conn, tenant, run_id, undigested)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            digests.update(await _finished(asyncio.to_thread(_digest_batch, batch)))
    return {
        item_id: pair.with_metadata if with_metadata else pair.without_metadata for item_id, pair in digests.items()
    }


@dataclass(frozen=True)
class _PairedKey:
    key: Key
    classified: Classified
    result_ids: tuple[int | None, int | None]  # the key's result in each run (baseline, candidate), if any


class CompareService:
    """CompareRuns and ListComparisonItems for any tenant the caller names."""

    def __init__(self, db: Database, page_tokens: PageTokens, judge_model: str = "") -> None:
        self._db = db
        self._page_tokens = page_tokens
        self._judge_model = judge_model  # --judge-model, for runs that did not record their judges' model
        self._pairing = Slots(1)  # one pairing thread at a time, tenants in turn (see the module docstring)
        # Pages with a `change` filter, which may pass over a whole run's keys to fill: a few at a time,
        # tenants in turn. 32 at once of two 50,000-evaluation runs, nothing matching (234 ms each), held
        # every reader connection and raised the event loop's lag p99 to 90 ms for every tenant.
        self._filtered_pages = Slots(FILTERED_PAGES)

    @contextlib.asynccontextmanager
    async def _turn(self, tenant: str) -> AsyncIterator[None]:
        """The one comparison under way, `tenant`'s when it is its turn: it reads both runs and pairs
        them inside it, so what comparisons hold at once is one comparison's chunks, whatever the number
        of callers (each read both runs whole before it queued: 8 comparisons of two 400,000-evaluation
        runs grew the server by 1.6 GB and every tenant's GetRun waited)."""
        await self._pairing.acquire(tenant)
        try:
            yield
        finally:
            self._pairing.release()

    @contextlib.asynccontextmanager
    async def _filtered_turn(self, tenant: str, filtered: bool) -> AsyncIterator[None]:
        """A turn for a page with a `change` filter (see `_filtered_pages`); none needed without one."""
        if not filtered:
            yield
            return
        await self._filtered_pages.acquire(tenant)
        try:
            yield
        finally:
            self._filtered_pages.release()

    async def _runs(self, tenant: str, baseline_id: str, candidate_id: str) -> tuple[run_pb2.Run, run_pb2.Run]:
        violations = [
            FieldViolation(field, "the run id is required")
            for field, value in (("baseline_run_id", baseline_id), ("candidate_run_id", candidate_id))
            if not value
        ]
        if violations:
            raise invalid_argument(violations)
        baseline = await run_store.get_current_run(self._db, tenant, baseline_id)
        if baseline is None:
            raise not_found("run", baseline_id)
        candidate = await run_store.get_current_run(self._db, tenant, candidate_id)
        if candidate is None:
            raise not_found("run", candidate_id)
        return baseline, candidate

    async def _pair_runs(
        self, tenant: str, baseline_id: str, candidate_id: str, pairing: Pairing, with_metadata: bool
    ) -> None:
        """Feed `pairing` both runs' evaluations in key order, PAIRING_CHUNK keys of each run at a time
        (ordered index ranges, as a ListComparisonItems page reads), merged in a worker thread: a chunk
        holds Python's one lock for milliseconds, never a run's whole pairing. With each chunk come the
        digests of its items (`_chunk_digests`), so the chunks' pairs are checked for the same item in both
        runs (their metadata too when `with_metadata`): what is held of items is their digests, a chunk's
        worth."""
        runs = (baseline_id, candidate_id)
        buffers: list[list[Evaluation]] = [[], []]
        digests: list[dict[str, bytes]] = [{}, {}]
        after: list[Key | None] = [None, None]
        done = [False, False]
        async with self._db.read() as conn:
            while True:
                for side in (0, 1):
                    if not buffers[side] and not done[side]:
                        chunk = await comparison_store.evaluations_after(
                            conn, tenant, runs[side], after[side], "", PAIRING_CHUNK
                        )
                        done[side] = len(chunk) < PAIRING_CHUNK
                        if chunk:
                            after[side] = chunk[-1][:3]
                        buffers[side] = chunk
                        digests[side] = await _chunk_digests(conn, tenant, runs[side], chunk, with_metadata)
                if all(done) and not any(buffers):
                    return
                # Keys past the last one read of a run not read to its end may still be in it: pair up to there.
                open_ends = [buffers[side][-1][:3] for side in (0, 1) if not done[side]]
                bound = min(open_ends) if open_ends else None
                base, cand = buffers
                buffers[0], buffers[1] = await _finished(
                    asyncio.to_thread(pairing.merge, base, cand, bound, (digests[0], digests[1]))
                )
                if bound is None:
                    return

    async def compare(self, tenant: str, request: cpb.CompareRunsRequest) -> cpb.RunComparison:
        """The comparison of two of the tenant's runs, as their results stand now."""
        alpha = request.alpha or DEFAULT_ALPHA
        if not MIN_ALPHA <= alpha <= 0.5:  # NaN fails it too
            raise invalid_argument([FieldViolation("alpha", f"must be from {MIN_ALPHA:g} to 0.5; 0 means 0.05")])
        baseline, candidate = await self._runs(tenant, request.baseline_run_id, request.candidate_run_id)
        order = [grader_name(g) for g in candidate.graders]
        order += [name for name in (grader_name(g) for g in baseline.graders) if name not in order]
        pairing = Pairing(order, changed_definitions(baseline, candidate, self._judge_model))
        async with self._turn(tenant):  # before reading: waiting comparisons hold nothing of their runs
            # Read again: the turn may have been waited for long. A run purged meanwhile is NOT_FOUND, as a
            # missing run (it was an empty comparison), and `partial` is the runs' status as reading starts:
            # a run that had ended then has all its results read, one that ends later may not.
            baseline, candidate = await self._runs(tenant, baseline.id, candidate.id)
            await self._pair_runs(tenant, baseline.id, candidate.id, pairing, metadata_compared(baseline, candidate))
        # Purged while it was read (its results deleted in chunks): NOT_FOUND, not a comparison of what was left.
        await self._runs(tenant, baseline.id, candidate.id)
        per_grader, overall = pairing.result(alpha)
        return cpb.RunComparison(
            baseline_run_id=baseline.id,
            candidate_run_id=candidate.id,
            alpha=alpha,
            partial=baseline.status in ACTIVE or candidate.status in ACTIVE,
            graders=per_grader,
            overall=overall,
            changed_items=pairing.changed_items,
        )

    async def list_items(
        self, tenant: str, request: cpb.ListComparisonItemsRequest
    ) -> tuple[list[cpb.ComparisonItem], str]:
        """A page of both runs' evaluations side by side, with results and outputs, and the next token.

        The page is chosen by its items' sizes (`_without_outputs`) and reads only the outputs of the items
        it keeps: it read and parsed the outputs of all its `page_size` items before its byte bound dropped
        what did not fit (6 pages at once of two runs of 4 MiB outputs: ~4 s each for one item, another
        tenant's GetRun p99 1.33 s)."""
        limit = page_size(request.page_size, 100)
        if request.change not in cpb.ComparisonChange.values():
            raise invalid_argument([FieldViolation("change", "unknown comparison change")])
        baseline, candidate = await self._runs(tenant, request.baseline_run_id, request.candidate_run_id)
        query = {"b": baseline.id, "c": candidate.id, "g": request.grader, "change": request.change}
        after = self._page_tokens.decode(tenant, "comparison_items", query, request.page_token)
        # A position this service signed: (item id, repetition, grader).
        position = None if after is None else (str(after[0]), int(after[1]), str(after[2]))
        classifying = _Classifying(
            (baseline.id, candidate.id),
            changed_definitions(baseline, candidate, self._judge_model),
            metadata_compared(baseline, candidate),
        )
        async with self._filtered_turn(tenant, bool(request.change)), self._db.read() as conn:
            keys = await _page_keys(conn, tenant, classifying, position, request.grader, request.change, limit + 1)
            page = keys[:limit]
            base_ids = [k.result_ids[0] for k in page if k.result_ids[0] is not None]
            cand_ids = [k.result_ids[1] for k in page if k.result_ids[1] is not None]
            base_results = await comparison_store.results_by_id(conn, tenant, base_ids)
            cand_results = await comparison_store.results_by_id(conn, tenant, cand_ids)
            base_by_key = {(r.item_id, r.repetition, r.grader): (r, sizes) for r, sizes in base_results}
            cand_by_key = {(r.item_id, r.repetition, r.grader): (r, sizes) for r, sizes in cand_results}
            sized = [
                self._without_outputs(paired, base_by_key.get(paired.key), cand_by_key.get(paired.key))
                for paired in page
            ]
            kept = sized[: self._page_tokens.fitting_sizes(size for _, size, _ in sized)]
            sides = [side for _, _, its in kept for side in its]
            outputs = await run_store.outputs_of(conn, tenant, [s.record.job_id for s in sides if s.sizes.output])
            explanations = await run_store.explanations_of(
                conn, tenant, [s.record.id for s in sides if s.sizes.explanation]
            )
        for side in sides:
            output, explanation = outputs.get(side.record.job_id), explanations.get(side.record.id)
            if (side.sizes.output and output is None) or (side.sizes.explanation and explanation is None):
                # Purged with its run since its size was read (nothing else deletes results or outputs).
                raise not_found("run", side.record.run_id)
            attach_output(side.result, output, side.share, explanation or "")
        items = [item for item, _, _ in kept]
        return self._page_tokens.page(tenant, "comparison_items", query, items, len(keys), lambda i: list(page[i].key))

    def _without_outputs(
        self,
        paired: _PairedKey,
        baseline: tuple[ResultRecord, StoredSizes] | None,
        candidate: tuple[ResultRecord, StoredSizes] | None,
    ) -> tuple[cpb.ComparisonItem, int, list[_Side]]:
        """The item of `paired` with each side's result (record without its explanation, sizes) but not its
        explanation or output; the size it has listed with them (evalsvc.runs.outputs); and its sides that
        have an explanation or output to attach. An item is at most `PageTokens.item_bytes` (one always
        fits in a response), split between its sides by `side_shares` (each at least half of what the key
        leaves, and what the other side leaves of it): an item carries two outputs, and two of 9 MB were a
        response over --max-message-bytes however small the page (INTERNAL)."""
        item = cpb.ComparisonItem(
            item_id=paired.key[0],
            repetition=paired.key[1],
            grader=paired.key[2],
            change=paired.classified.change,
            unpaired_reason=paired.classified.unpaired_reason,
        )
        total = self._page_tokens.item_bytes - item.ByteSize() - 2 * FRAMING
        pairs = ((item.baseline, baseline), (item.candidate, candidate))
        needs = [0, 0]  # what each side takes listed whole (an absent side nothing)
        for at, (side, found) in enumerate(pairs):
            if found is not None:
                record, sizes = found
                side.CopyFrom(run_store.result_from(record, None))
                needs[at] = listed_size(side, sizes.output, total, sizes.explanation)
        # Each side is cut to its share of the item: what the other leaves, at least half (an empty
        # baseline no longer halves the candidate's room).
        shares = side_shares(total, (needs[0], needs[1]))
        size = item.ByteSize()
        sides: list[_Side] = []
        for (side, found), share in zip(pairs, shares, strict=True):
            if found is None:
                continue
            record, sizes = found
            size += listed_size(side, sizes.output, share, sizes.explanation) + FRAMING
            if sizes.output or sizes.explanation:
                sides.append(_Side(side, record, sizes, share))
        return item, size, sides


@dataclass(frozen=True, slots=True)
class _Side:
    """A side of a listed comparison item whose explanation or output is still to be read and attached."""

    result: run_pb2.Result  # in its item, without its explanation and output
    record: ResultRecord
    sizes: StoredSizes
    share: int  # the most the result may be listed as


@dataclass(frozen=True)
class _Classifying:
    """What classifies a page's keys as CompareRuns does (`classify`): the runs (baseline, candidate), their
    graders whose definitions differ, and whether items' metadata is compared."""

    run_ids: tuple[str, str]
    changed: frozenset[str]
    with_metadata: bool


async def _page_keys(
    conn: AsyncConnection,
    tenant: str,
    classifying: _Classifying,
    after: Key | None,
    grader: str,
    change: int,
    wanted: int,
) -> list[_PairedKey]:
    """The first `wanted` keys after `after` of either run (baseline, candidate) with grader `grader`
    (any for "") and change `change` (any for 0), in key order, each classified as CompareRuns counts it
    (`classify`, with the digests of the round's items, `_chunk_digests`: a change filter lists what
    CompareRuns counted).

    Each round reads each run's next `chunk` keys (an ordered index range, store.evaluations_after).
    A read that came back full ends at some key; past it, that run may have keys not read yet. So the
    keys of both runs are complete up to the smaller end of the full reads (to the end of both runs
    when neither was full), and there are at least `chunk` of them: the round takes them in order,
    with their change, and the next round starts after them. Without a `change` filter the first
    round already holds the page; with one, rounds go on until the page is full or both runs end,
    every read letting the event loop serve others. The reads and `sorted` here agree on the order
    because the key columns compare by code point on both engines (models.code_point_ordered).
    No pairing slot, and no thread but to hash the items of a run stored before their digests were: a
    round's work is bounded by MAX_CHUNK keys per run."""
    found: list[_PairedKey] = []
    chunk = wanted
    while True:
        base = await comparison_store.evaluations_after(conn, tenant, classifying.run_ids[0], after, grader, chunk)
        cand = await comparison_store.evaluations_after(conn, tenant, classifying.run_ids[1], after, grader, chunk)
        ends = [rows[-1][:3] for rows in (base, cand) if len(rows) == chunk]
        complete = min(ends) if ends else None  # None: both runs read to their end
        base_by, cand_by = _by_key(base), _by_key(cand)
        base_items = await _chunk_digests(conn, tenant, classifying.run_ids[0], base, classifying.with_metadata)
        cand_items = await _chunk_digests(conn, tenant, classifying.run_ids[1], cand, classifying.with_metadata)
        for key in sorted(base_by.keys() | cand_by.keys()):
            if complete is not None and key > complete:
                break
            same_item = base_items.get(key[0]) == cand_items.get(key[0])
            b, c = base_by.get(key), cand_by.get(key)
            classified = classify(
                None if b is None else b[0], None if c is None else c[0], same_item, key[2] in classifying.changed
            )
            paired = _PairedKey(key, classified, (None if b is None else b[1], None if c is None else c[1]))
            if not change or classified.change == change:
                found.append(paired)
                if len(found) == wanted:
                    return found
        if complete is None:
            return found
        after, chunk = complete, min(2 * chunk, max(wanted, MAX_CHUNK))
