"""The caller's key, checked before a request's body is read.

A gRPC server checks a call's key before it reads the request (evalsvc.api.interceptor); the gateway
read and parsed a whole JSON body first, and the key was checked only when the translated call reached
the service. A keyless `POST /v1/runs` whose one item held a metadata map of a million entries (14 MB)
cost 12 s of CPU in the translator threads every tenant shares before its 401, and four such clients
made another tenant's CreateRun take 53 s instead of 65 ms. Now a request with a body presents a valid
key before any of its body is read (evalsvc.gateway.request_limits).

How the key is checked depends on where the service is (`KeyCheck`): inside `evalsvc serve` the
embedded gateway asks the process's own key check (`evalsvc.api.local.LocalChannel.key_refusal`: the
calls' check and cache, and no call); the standalone gateway, which has only a gRPC channel,
`PreflightKeys`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc

from evalsvc.gateway.translators import OFF_LOOP_BYTES
from evalsvc.gateway.upstream import Upstream
from evalsvc.v1 import eval_run_service_pb2

Metadata: TypeAlias = tuple[tuple[str, str], ...]
# Why a call presenting these headers (as gRPC metadata) would be refused, as the failed call's error;
# None when the key is valid. The error is the service's own: the gateway renders it as any other.
KeyCheck: TypeAlias = Callable[[Metadata], Awaitable["grpc.aio.AioRpcError | None"]]

PREFLIGHT_TIMEOUT_S = 10.0
# The answers of the pre-flight GetRun that only a call whose key was accepted gets (no run has an empty id).
_PAST_THE_KEY = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
MAX_PROVEN = 10_000  # keys remembered as proven; past it the oldest proofs are forgotten first


class PreflightKeys:
    """The standalone gateway's `KeyCheck`: one cheap authenticated call (GetRun with no run id, which
    the service refuses once the key is checked, without reading anything) for a key
    not proven in the last `proven_s` seconds (--auth-cache-s, the service's own cache of verified
    keys: a revocation takes effect within it anyway). The service's answer and its timing are its
    own, so a refused key tells no more than the call itself would (which key ids exist: see
    evalsvc.auth.service.KeyService); only keys the service accepted are remembered, by digest.

    Only bodies worth it are checked (`worth_checking`): one the translators parse, of OFF_LOOP_BYTES
    or more, or one whose size is not declared (chunked); a smaller body is read within
    --http-body-timeout-s and parsed on the loop in less than the call would take, and the service
    checks the key of its call. The pre-flight is a call of its own, counted by the service as any
    other, but it ends before the request's call starts: the tenant never has both under way."""

    def __init__(self, upstream: Upstream, proven_s: float) -> None:
        self._upstream = upstream
        self._proven_s = proven_s
        self._proven: dict[str, float] = {}  # digest of the key's headers -> when the service last accepted it

    @staticmethod
    def worth_checking(declared_bytes: int | None) -> bool:
        """Whether a body of `declared_bytes` (None: not declared) is checked before it is read."""
        return declared_bytes is None or declared_bytes >= OFF_LOOP_BYTES

    async def __call__(self, metadata: Metadata) -> grpc.aio.AioRpcError | None:
        digest = hashlib.sha256(repr(metadata).encode()).hexdigest()
        now = time.monotonic()
        proven = self._proven.get(digest)
        if proven is not None and now - proven < self._proven_s:
            return None
        try:
            await self._upstream.runs.GetRun(
                eval_run_service_pb2.GetRunRequest(), metadata=metadata, timeout=PREFLIGHT_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            if error.code() not in _PAST_THE_KEY:  # refused before the servicer: the answer
                return error
        if self._proven_s > 0:
            self._proven.pop(digest, None)
            self._proven[digest] = now
            while len(self._proven) > MAX_PROVEN:
                del self._proven[next(iter(self._proven))]
        return None
