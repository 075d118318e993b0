"""Saved graders and targets, and resolving a run's references to them.

A run stores the exact definitions it used (snapshots): references are resolved when the run is
created, so results stay explainable after a saved definition changes or is deleted - a run created
before DeleteGrader or DeleteTarget (running or finished) goes on and reads back as it was; a run
created after it cannot name the deleted one (NOT_FOUND). A tenant holds at most
--max-graders-per-tenant saved graders (each with all its versions) and --max-targets-per-tenant saved
targets, and what they store counts towards --max-stored-bytes-per-tenant (evalsvc.store.usage): the
counts alone allowed about 256 GiB of grader versions a tenant. Ids are the server's and never reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import FieldViolation, invalid_argument, not_found
from evalsvc.graders.judge import judge_secret_refs
from evalsvc.graders.validation import validate_grader
from evalsvc.http.outbound import AllowList, destination_violations, named_endpoints
from evalsvc.idempotency import create_once, fingerprint
from evalsvc.ids import PageTokens, new_id, page_size
from evalsvc.limits import StoredCaps, TenantLimits, in_page_line
from evalsvc.messages.convert import timestamp
from evalsvc.messages.validation import MAX_DESCRIPTION, MAX_DISPLAY_NAME, MAX_REQUEST_ID, check_labels, check_length
from evalsvc.secrets.service import SecretService
from evalsvc.store import definitions as store
from evalsvc.store.db import Database
from evalsvc.store.records import GraderVersionRecord, SavedGraderRecord, SavedTargetRecord
from evalsvc.targets import target_secret_refs, validate_target
from evalsvc.v1 import grader_pb2, grader_service_pb2, target_pb2, target_service_pb2


def _check_common(
    display_name: str, description: str, labels: Mapping[str, str], request_id: str, at: str
) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    check_length(request_id, MAX_REQUEST_ID, "request_id", out)
    check_length(display_name, MAX_DISPLAY_NAME, f"{at}.display_name", out)
    check_length(description, MAX_DESCRIPTION, f"{at}.description", out)
    check_labels(labels, f"{at}.labels", out)
    return out


def saved_grader_from(grader: SavedGraderRecord, version: GraderVersionRecord) -> grader_service_pb2.SavedGrader:
    """The SavedGrader message of a grader at one version."""
    return grader_service_pb2.SavedGrader(
        id=grader.id,
        display_name=grader.display_name,
        description=grader.description,
        labels=grader.labels or {},
        version=version.version,
        latest_version=grader.latest_version,
        grader=grader_pb2.Grader.FromString(version.definition),
        create_time=timestamp(grader.create_time),
        version_create_time=timestamp(version.create_time),
    )


def saved_target_from(target: SavedTargetRecord) -> target_service_pb2.SavedTarget:
    """The SavedTarget message of a saved target."""
    return target_service_pb2.SavedTarget(
        id=target.id,
        display_name=target.display_name,
        description=target.description,
        labels=target.labels or {},
        target=target_pb2.Target.FromString(target.definition),
        create_time=timestamp(target.create_time),
    )


class DefinitionService:
    """Saved graders and targets of one database, for any tenant the caller names."""

    def __init__(
        self,
        db: Database,
        secrets: SecretService,
        outbound_allow: AllowList,
        page_tokens: PageTokens,
        caps: StoredCaps,
        limits: TenantLimits,
        *,
        on_deleted: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._on_deleted = on_deleted  # wakes the purge loop (evalsvc.runs.retention.RunPurger.wake)
        self._limits = limits
        self._caps = caps
        self._secrets = secrets
        self._outbound_allow = outbound_allow
        self._page_tokens = page_tokens

    @property
    def limits(self) -> TenantLimits:
        """The tenants' limits, whose line its page reads take their turns in (`in_page_line`)."""
        return self._limits

    async def _check_grader(self, tenant: str, grader: grader_pb2.Grader, at: str) -> list[FieldViolation]:
        if grader.WhichOneof("kind") == "saved":
            return [FieldViolation(f"{at}.saved", "a saved grader cannot refer to another saved grader")]
        return validate_grader(grader, at) + await self._secrets.refused(tenant, judge_secret_refs(grader, at))

    async def _check_destinations(self, tenant: str, endpoints: list[tuple[str, str]]) -> None:
        """Refuse a definition naming an endpoint the server would never call (the SSRF rule), so
        it is not stored only to fail every run that uses it."""
        if refused := await destination_violations(endpoints, self._outbound_allow, tenant):
            raise invalid_argument(refused)

    async def create_grader(
        self, tenant: str, request: grader_service_pb2.CreateGraderRequest
    ) -> grader_service_pb2.SavedGrader:
        """Save a grader as version 1 (idempotent by request_id)."""
        spec = request.grader
        violations = _check_common(spec.display_name, spec.description, spec.labels, request.request_id, "grader")
        violations += await self._check_grader(tenant, spec.grader, "grader.grader")
        if violations:
            raise invalid_argument(violations)
        await self._check_destinations(tenant, named_endpoints(graders=[("grader.grader", spec.grader)]))
        definition = grader_service_pb2.SavedGrader(
            display_name=spec.display_name, description=spec.description, labels=spec.labels, grader=spec.grader
        )
        now = time.time()
        grader = SavedGraderRecord(
            id=new_id("grd"),
            tenant=tenant,
            request_id=request.request_id or None,
            request_hash=fingerprint(definition),
            display_name=spec.display_name,
            description=spec.description,
            labels=dict(spec.labels),
            latest_version=1,
            create_time=now,
        )
        version = GraderVersionRecord(
            grader_id=grader.id, version=1, tenant=tenant, definition=spec.grader.SerializeToString(), create_time=now
        )

        async def create(conn: AsyncConnection) -> grader_service_pb2.SavedGrader:
            self._caps.graders.check(await store.count_graders(conn, tenant))
            await store.insert_grader(conn, grader, version, self._caps.stored_bytes)
            return saved_grader_from(grader, version)

        async def replay(existing: SavedGraderRecord) -> grader_service_pb2.SavedGrader:
            return await self.get_grader(tenant, existing.id, 1)

        return await create_once(
            self._db,
            kind="grader",
            request_id=request.request_id,
            fingerprint=grader.request_hash,
            find=lambda conn: store.find_grader_by_request_id(conn, tenant, request.request_id),
            create=create,
            replay=replay,
        )

    async def get_grader(self, tenant: str, grader_id: str, version: int) -> grader_service_pb2.SavedGrader:
        """A saved grader at a version (0 = latest); NOT_FOUND when missing or another tenant's."""
        if version < 0:
            raise invalid_argument([FieldViolation("version", "must be >= 0 (0 means the latest)")])
        async with self._db.read() as conn:
            found = await store.get_grader(conn, tenant, grader_id, version)
        if found is None:
            raise not_found("grader", grader_id)
        return saved_grader_from(*found)

    @in_page_line
    async def list_graders(
        self, tenant: str, request: grader_service_pb2.ListGradersRequest
    ) -> tuple[list[grader_service_pb2.SavedGrader], str]:
        """A page of graders at their latest versions. It chooses its graders by their stored sizes and then
        reads only those: read whole, a page of 1,000 graders of 256 KiB read and parsed ~250 MB to answer
        with the 33 its bytes bound kept (8 at once: another tenant's GetRun 3 -> 907 ms)."""
        limit = page_size(request.page_size, 50)
        before = self._page_tokens.decode(tenant, "graders", {}, request.page_token)
        async with self._db.read() as conn:
            sizes = await store.grader_sizes(conn, tenant, before_id=before, limit=limit + 1)
            chosen = self._page_tokens.choose(sizes, limit)
            # By id, as DatasetService.list: a grader created between the reads pushed one off the page.
            rows = await store.list_graders(conn, tenant, chosen.positions)
        graders = [saved_grader_from(grader, version) for grader, version in rows]
        return self._page_tokens.chosen_page(tenant, "graders", {}, graders, lambda i: graders[i].id, chosen)

    async def update_grader(
        self, tenant: str, request: grader_service_pb2.UpdateGraderRequest
    ) -> grader_service_pb2.SavedGrader:
        """Save a new, immutable version."""
        violations = await self._check_grader(tenant, request.grader, "grader")
        if violations:
            raise invalid_argument(violations)
        await self._check_destinations(tenant, named_endpoints(graders=[("grader", request.grader)]))
        now = time.time()
        definition = request.grader.SerializeToString()

        async def add(conn: AsyncConnection) -> tuple[SavedGraderRecord, GraderVersionRecord] | None:
            # The bump locks the grader's row and counts its versions (never deleted one by one): past a
            # cap the refusal rolls it back.
            grader = await store.bump_version(conn, tenant, request.grader_id)
            if grader is None:
                return None
            self._caps.grader_versions.check(
                grader.latest_version - 1,
                holder=f"grader {request.grader_id}",
                remedy="save the definition as a new grader (CreateGrader)",
            )
            version = GraderVersionRecord(
                grader_id=grader.id,
                version=grader.latest_version,
                tenant=tenant,
                definition=definition,
                create_time=now,
            )
            await store.insert_version(conn, version, self._caps.stored_bytes)
            return grader, version

        added = await self._db.transact(add)
        if added is None:
            raise not_found("grader", request.grader_id)
        return saved_grader_from(*added)

    async def delete_grader(self, tenant: str, grader_id: str) -> None:
        """Delete a saved grader and its versions; NOT_FOUND when missing or another tenant's."""
        if not await self._db.transact(lambda conn: store.remove_grader(conn, tenant, grader_id)):
            raise not_found("grader", grader_id)
        # NOT_FOUND from that commit on, and the call answers: its versions go in the purge loop's passes,
        # a chunk per transaction, other writes between them (see DatasetService.delete).
        self._on_deleted()

    async def create_target(
        self, tenant: str, request: target_service_pb2.CreateTargetRequest
    ) -> target_service_pb2.SavedTarget:
        """Save a target (idempotent by request_id)."""
        spec = request.target
        violations = _check_common(spec.display_name, spec.description, spec.labels, request.request_id, "target")
        if spec.target.WhichOneof("kind") == "saved_target_id":
            violations.append(FieldViolation("target.target.saved_target_id", "a saved target cannot refer to another"))
        else:
            violations += validate_target(spec.target, "target.target")
            violations += await self._secrets.refused(tenant, target_secret_refs(spec.target, "target.target"))
        if violations:
            raise invalid_argument(violations)
        await self._check_destinations(tenant, named_endpoints(spec.target, "target.target"))
        definition = target_service_pb2.SavedTarget(
            display_name=spec.display_name, description=spec.description, labels=spec.labels, target=spec.target
        )
        target = SavedTargetRecord(
            id=new_id("tgt"),
            tenant=tenant,
            request_id=request.request_id or None,
            request_hash=fingerprint(definition),
            display_name=spec.display_name,
            description=spec.description,
            labels=dict(spec.labels),
            definition=spec.target.SerializeToString(),
            create_time=time.time(),
        )

        async def create(conn: AsyncConnection) -> target_service_pb2.SavedTarget:
            self._caps.targets.check(await store.count_targets(conn, tenant))
            await store.insert_target(conn, target, self._caps.stored_bytes)
            return saved_target_from(target)

        async def replay(existing: SavedTargetRecord) -> target_service_pb2.SavedTarget:
            return saved_target_from(existing)

        return await create_once(
            self._db,
            kind="target",
            request_id=request.request_id,
            fingerprint=target.request_hash,
            find=lambda conn: store.find_target_by_request_id(conn, tenant, request.request_id),
            create=create,
            replay=replay,
        )

    async def get_target(self, tenant: str, target_id: str) -> target_service_pb2.SavedTarget:
        """A saved target; NOT_FOUND when missing or another tenant's."""
        async with self._db.read() as conn:
            target = await store.get_target(conn, tenant, target_id)
        if target is None:
            raise not_found("target", target_id)
        return saved_target_from(target)

    @in_page_line
    async def list_targets(
        self, tenant: str, request: target_service_pb2.ListTargetsRequest
    ) -> tuple[list[target_service_pb2.SavedTarget], str]:
        """A page of saved targets, chosen by their stored sizes before they are read (as `list_graders`)."""
        limit = page_size(request.page_size, 50)
        before = self._page_tokens.decode(tenant, "targets", {}, request.page_token)
        async with self._db.read() as conn:
            sizes = await store.target_sizes(conn, tenant, before_id=before, limit=limit + 1)
            chosen = self._page_tokens.choose(sizes, limit)
            rows = await store.list_targets(conn, tenant, chosen.positions)
        targets = [saved_target_from(row) for row in rows]
        return self._page_tokens.chosen_page(tenant, "targets", {}, targets, lambda i: targets[i].id, chosen)

    async def delete_target(self, tenant: str, target_id: str) -> None:
        """Delete a saved target; NOT_FOUND when missing or another tenant's."""
        if not await self._db.transact(lambda conn: store.remove_target(conn, tenant, target_id)):
            raise not_found("target", target_id)

    async def resolve(self, tenant: str, target: target_pb2.Target, graders: Iterable[grader_pb2.Grader]) -> None:
        """Replace saved references by the definitions they name, in place (the run's snapshot)."""
        if target.WhichOneof("kind") == "saved_target_id":
            model_id = target.model_id
            saved = await self.get_target(tenant, target.saved_target_id)
            target.CopyFrom(saved.target)
            target.model_id = model_id or saved.target.model_id
        for grader in graders:
            if grader.WhichOneof("kind") != "saved":
                continue
            saved_grader = await self.get_grader(tenant, grader.saved.grader_id, grader.saved.version)
            name, weight = grader.name, grader.weight
            grader.CopyFrom(saved_grader.grader)
            grader.name = name or saved_grader.grader.name or saved_grader.id
            grader.weight = weight or saved_grader.grader.weight
