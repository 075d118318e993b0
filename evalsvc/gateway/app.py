"""The gateway's ASGI app: native proto3-JSON routes (one per `google.api.http` rule) and the
WatchRun stream as Server-Sent Events or NDJSON.

Bodies are the canonical proto3 JSON mapping (`google.protobuf.json_format`, lowerCamelCase, enums
by name, int64 as strings), as grpc-gateway produces. Errors map gRPC codes to HTTP statuses as
grpc-gateway does, with the `google.rpc.Status` as the body: `{code, message, details}`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from grpc_status import rpc_status

from evalsvc.gateway import dialects
from evalsvc.gateway.routes import Route, routes
from evalsvc.gateway.upstream import HTTP_STATUS, Upstream

FORWARDED_HEADERS = ("authorization", "x-api-key")


def to_json(message: Message) -> dict[str, Any]:
    """The canonical proto3 JSON of a message, every field present (grpc-gateway's default)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def status_body(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """`{code, message, details}`: the google.rpc.Status of a failed call, as JSON."""
    status = rpc_status.from_call(error)
    if status is not None:
        return json_format.MessageToDict(status, always_print_fields_with_no_presence=True)
    return {"code": error.code().value[0], "message": error.details() or "", "details": []}


def error_response(error: grpc.aio.AioRpcError) -> JSONResponse:
    """The HTTP response for a failed call."""
    return JSONResponse(status_code=HTTP_STATUS.get(error.code(), 500), content=status_body(error))


def bad_request(message: str) -> JSONResponse:
    """400 for JSON the gateway cannot even turn into a request message."""
    return JSONResponse(status_code=400, content={"code": 3, "message": message, "details": []})


def _message_class(descriptor: Any) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    return tuple((name, request.headers[name]) for name in FORWARDED_HEADERS if name in request.headers)


def _query_fields(request: Request, route: Route) -> dict[str, Any]:
    """Query parameters as request fields (repeated fields may repeat; `labels.k=v` sets map entries)."""
    fields = route.method.input_type.fields_by_name
    json_names = {f.json_name: f for f in route.method.input_type.fields}
    values: dict[str, Any] = {}
    for key in set(request.query_params.keys()):
        if key.startswith("labels.") and "labels" in fields:
            values.setdefault("labels", {})[key[len("labels.") :]] = request.query_params[key]
            continue
        field = fields.get(key) or json_names.get(key)
        if field is None:
            continue
        items = request.query_params.getlist(key)
        values[field.json_name] = items if field.is_repeated else items[-1]
    return values


async def build_request(request: Request, route: Route) -> Message:
    """The gRPC request of an HTTP request: body, then query, then path parameters."""
    message = _message_class(route.method.input_type)()
    if route.body:
        raw = await request.body()
        if raw.strip():
            json_format.Parse(raw, message, ignore_unknown_fields=True)
    json_format.ParseDict(_query_fields(request, route), message, ignore_unknown_fields=True)
    for name, value in request.path_params.items():
        setattr(message, name, value)
    return message


def create_app(channel_factory: Callable[[], grpc.aio.Channel], dialect_spec: str = "all") -> FastAPI:
    """The gateway app, calling the service over a channel made by `channel_factory`, with the vendor
    dialects `dialect_spec` names (see `dialects.mounts`) beside the native routes."""
    upstream = Upstream(channel_factory)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        upstream.open()
        try:
            yield
        finally:
            await upstream.close()

    app = FastAPI(
        title="evalsvc",
        version="v1",
        description="The evalsvc API as proto3 JSON over HTTP (a translator in front of the gRPC service).",
        lifespan=lifespan,
    )

    def unary_endpoint(route: Route) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                message = await build_request(request, route)
            except json_format.ParseError as exc:
                return bad_request(f"invalid JSON for {route.method.input_type.full_name}: {exc}")
            call: grpc.aio.UnaryUnaryMultiCallable[Message, Message] = upstream.channel.unary_unary(
                route.grpc_path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=_message_class(route.method.output_type).FromString,
            )
            try:
                response = await call(message, metadata=_metadata(request), timeout=60)
            except grpc.aio.AioRpcError as error:
                return error_response(error)
            return JSONResponse(to_json(response))

        return endpoint

    def stream_endpoint(route: Route) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                message = await build_request(request, route)
            except json_format.ParseError as exc:
                return bad_request(f"invalid query for {route.method.input_type.full_name}: {exc}")
            last_event_id = request.headers.get("last-event-id", "")
            if last_event_id.isdigit() and hasattr(message, "after_seq"):
                message.after_seq = int(last_event_id)  # an EventSource resuming
            call = cast(
                "grpc.aio.UnaryStreamMultiCallable[Message, Message]",
                upstream.channel.unary_stream(
                    route.grpc_path,
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=_message_class(route.method.output_type).FromString,
                ),
            )(message, metadata=_metadata(request))
            try:
                first = await call.read()  # fail as a plain HTTP error before the stream starts
            except grpc.aio.AioRpcError as error:
                return error_response(error)
            ndjson = "application/x-ndjson" in request.headers.get("accept", "")
            return StreamingResponse(
                _relay(call, first, ndjson),
                media_type="application/x-ndjson" if ndjson else "text/event-stream",
                headers={"cache-control": "no-cache"},
            )

        return endpoint

    for route in routes():
        endpoint = stream_endpoint(route) if route.method.server_streaming else unary_endpoint(route)
        app.add_api_route(
            route.path,
            endpoint,
            methods=[route.verb.upper()],
            name=route.method.name,
            summary=route.method.name,
            description=f"gRPC `{route.grpc_path}`: {route.method.input_type.full_name} -> "
            f"{route.method.output_type.full_name} as proto3 JSON"
            + (
                " (Server-Sent Events, or NDJSON with `Accept: application/x-ndjson`)"
                if route.method.server_streaming
                else ""
            ),
        )
    for dialect, prefix in dialects.mounts(dialect_spec):
        app.include_router(dialect.router(upstream), prefix=prefix, tags=[dialect.title])
    return app


async def _relay(call: Any, first: Any, ndjson: bool) -> AsyncIterator[bytes]:
    """Stream messages as SSE (`id:` = seq, so EventSource resumes with Last-Event-ID) or NDJSON
    (`{"result": ...}` per line, grpc-gateway style). A client that disconnects cancels the gRPC call."""
    try:
        message = first
        while message is not grpc.aio.EOF:
            body = to_json(message)
            if ndjson:
                yield (json.dumps({"result": body}) + "\n").encode()
            else:
                kind = message.WhichOneof("event") if hasattr(message, "WhichOneof") else None
                seq = getattr(message, "seq", 0)
                head = f"id: {seq}\n" if seq else ""
                yield f"{head}event: {kind or 'message'}\ndata: {json.dumps(body)}\n\n".encode()
            message = await call.read()
    except grpc.aio.AioRpcError as error:
        body = status_body(error)
        if ndjson:
            yield (json.dumps({"error": body}) + "\n").encode()
        else:
            yield f"event: error\ndata: {json.dumps(body)}\n\n".encode()
    finally:
        call.cancel()
