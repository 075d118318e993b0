"""What a caller without an API key may send: grpc's health service and server reflection, bounded in size.

Their requests are a service name (health) or a symbol or file name (reflection), tens of bytes, but
they were taken up to --max-message-bytes (16 MiB) like any tenant's: an anonymous health Watch kept its
8 MiB `service` name for as long as its stream stayed open (60 such streams took the server from 144 to
1,587 MiB), and an anonymous request over 1 MiB went to the one process that checks tenants' large
requests (evalsvc.api.decoding), in a line of its own that every anonymous caller shared, ahead of the
tenants' requests in the rotation. Now a request message of one of these methods over MAX_REQUEST_BYTES
ends the call INVALID_ARGUMENT before it is parsed (`too_large`): it is never kept, never checked. A
health service name is at most MAX_SERVICE_NAME_CHARS (evalsvc.api.health).

grpc.aio has no size bound per method on a server (`grpc.max_receive_message_length` is the server's,
--max-message-bytes; grpc's per-method limits come from a service config, which only a client channel
applies): such a request is still received whole by grpc's core, within the bounds every call's request
has (evalsvc.api.admission), and dropped as soon as it has arrived.
"""

from __future__ import annotations

from evalsvc.errors import FieldViolation, ServiceError, invalid_argument

MAX_REQUEST_BYTES = 4096
MAX_SERVICE_NAME_CHARS = 256
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def service_name_too_long(chars: int) -> ServiceError:
    """INVALID_ARGUMENT naming `service`: a health service name over MAX_SERVICE_NAME_CHARS."""
    return invalid_argument(
        [
            FieldViolation(
                "service", f"{chars} characters: a service name is at most {MAX_SERVICE_NAME_CHARS} characters"
            )
        ]
    )


def too_large(method: str, size: int) -> ServiceError:
    """INVALID_ARGUMENT for a request of `size` bytes (over MAX_REQUEST_BYTES) of `method`, a keyless one.
    A health request's one field is `service`, so its refusal names that field; a reflection message's,
    the request."""
    if method.startswith(HEALTH_PREFIX):
        return invalid_argument(
            [
                FieldViolation(
                    "service",
                    f"a request of {size} bytes: a service name is at most {MAX_SERVICE_NAME_CHARS} characters",
                )
            ]
        )
    return invalid_argument(
        [
            FieldViolation(
                "request",
                f"{size} bytes: a request of a method that needs no API key is at most {MAX_REQUEST_BYTES} bytes",
            )
        ]
    )
