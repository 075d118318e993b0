"""evalsvc.errors: the google.rpc.Status every door renders a domain error as."""

from __future__ import annotations

import grpc
import pytest
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2

from evalsvc.errors import Reason, ServiceError, to_status
from evalsvc.gateway.upstream import GatewayError, with_retry_after


def retry_delay_s(seconds: float) -> float:
    """The RetryInfo delay, in seconds, of a quota error that asks for `seconds` of waiting."""
    error = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TENANT_QUOTA_EXCEEDED, "slow down")
    error.retry_after_s = seconds
    [info] = [d for d in to_status(error).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    retry = error_details_pb2.RetryInfo()
    info.Unpack(retry)
    return retry.retry_delay.ToTimedelta().total_seconds()


@pytest.mark.parametrize(
    ("seconds", "sent"),
    [(0.0, 0.001), (0.0004, 0.001), (0.0231, 0.024), (0.023, 0.023), (2.0, 2.0)],
)
def test_a_retry_delay_is_rounded_up_to_the_millisecond_and_never_zero(seconds: float, sent: float) -> None:
    """A token bucket's sub-millisecond wait was truncated to "0s": retry at once, which fails again."""
    assert retry_delay_s(seconds) == pytest.approx(sent)


def test_any_retry_delay_gives_rest_a_retry_after_of_at_least_a_second() -> None:
    """The REST 429 of a sub-millisecond wait had no Retry-After at all."""
    error = GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry_after_s=retry_delay_s(0.0004))
    assert with_retry_after(JSONResponse({}), error).headers["retry-after"] == "1"
