"""A message already serialized, handed down to the transport as it is."""

from __future__ import annotations

from typing import Generic, TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


class Encoded(Generic[M]):
    """The wire bytes of a message of `message_type`, yielded by a stream instead of the message.

    A watcher's events are read from the log serialized, and a run event carries the whole run (up to
    a quarter of --max-message-bytes): parsed to be yielded, then serialized again for grpc, each event
    was held three times per stream (the bytes, the parsed message, the new bytes) while the client did
    not read, ~13 MB per stream for a run of 4 MB definitions. Yielded as `Encoded`, the bytes read
    from the log (shared by the watchers that opened together) are the bytes grpc sends: a gRPC server's
    interceptor passes `data` on unchanged (evalsvc.api.interceptor `Outgoing`), and only the in-process
    channel, whose callers take messages, parses it."""

    __slots__ = ("data", "message_type")

    def __init__(self, data: bytes, message_type: type[M]) -> None:
        self.data = data
        self.message_type = message_type

    def parse(self) -> M:
        """The message (for a caller that takes messages, not bytes)."""
        return self.message_type.FromString(self.data)
