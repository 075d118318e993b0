"""Native routes, derived from the `google.api.http` annotations of the protos, so the REST mapping
and the contract cannot drift apart (tests/test_gateway.py checks every RPC has a route); and HEAD
wherever GET, added the same way to every router of the gateway, native, dialect or UI (`serve_head`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi.routing import APIRoute, APIRouter
from google.api import annotations_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from starlette.convertors import StringConvertor, register_url_convertor

from evalsvc.v1 import (
    dataset_generation_pb2,
    dataset_service_pb2,
    eval_run_service_pb2,
    grader_service_pb2,
    secret_service_pb2,
    target_service_pb2,
    webhook_service_pb2,
)

SERVICES: tuple[ServiceDescriptor, ...] = (
    eval_run_service_pb2.DESCRIPTOR.services_by_name["EvalRunService"],
    dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"],
    dataset_generation_pb2.DESCRIPTOR.services_by_name["DatasetGenerationService"],
    grader_service_pb2.DESCRIPTOR.services_by_name["GraderService"],
    target_service_pb2.DESCRIPTOR.services_by_name["TargetService"],
    secret_service_pb2.DESCRIPTOR.services_by_name["SecretService"],
    webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"],
)
_VERBS = ("get", "post", "put", "patch", "delete")
ID_CONVERTOR = "resource_id"


class _IdConvertor(StringConvertor):
    """A path parameter of a native route: an id or a secret's name, never with a `:` (the service makes
    ids as `run_<hex>`, a secret's name is a letter then letters, digits and `_`). Starlette's default
    took any text up to the next `/`, so `GET /v1/runs/<id>:wacth`, a mistyped custom method, was GetRun of
    the run `<id>:wacth`: 404 RUN_NOT_FOUND for a run that exists. With `:` out, such a path is no route's."""

    regex = "[^/:]+"


register_url_convertor(ID_CONVERTOR, _IdConvertor())


@dataclass(frozen=True)
class Route:
    """One HTTP rule of one RPC."""

    verb: str
    path: str  # e.g. /v1/runs/{run_id}:cancel
    body: str  # "*" (the whole request), a field name, or "" (no body)
    method: MethodDescriptor

    @property
    def path_params(self) -> list[str]:
        """Request fields taken from the path."""
        return re.findall(r"{(\w+)}", self.path)

    @property
    def routed_path(self) -> str:
        """The path as the app routes it: each parameter an id (`{run_id:resource_id}`, `_IdConvertor`)."""
        return re.sub(r"{(\w+)}", rf"{{\1:{ID_CONVERTOR}}}", self.path)

    @property
    def grpc_path(self) -> str:
        """The gRPC method path, e.g. /evalsvc.v1.EvalRunService/GetRun."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


def custom_methods(path: str) -> list[str]:
    """The custom methods the native routes have on the resource at `path` (`/v1/runs/{run_id}`, whatever
    its parameters are named), as `:name (VERB)`, sorted: what a path with an unknown one (`:wacth`) lists."""
    shape = re.sub(r"{[^}]*}", "{}", path)
    found = set()
    for route in routes():
        resource, colon, name = route.path.rpartition(":")
        if colon and re.sub(r"{[^}]*}", "{}", resource) == shape:
            found.add(f":{name} ({route.verb.upper()})")
    return sorted(found)


def routes() -> Iterator[Route]:
    """Every annotated RPC, custom-method paths (`...:verb`) first so they win over plain ones."""
    found = []
    for service in SERVICES:
        for method in service.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            verb = next((v for v in _VERBS if getattr(rule, v)), None)
            if verb is None:
                continue
            found.append(Route(verb, getattr(rule, verb), rule.body, method))
    yield from sorted(found, key=lambda r: (":" not in r.path, r.path))


def serve_head(router: APIRouter) -> None:
    """HEAD wherever GET (RFC 9110 9.3.2), on every route of `router`: a twin of each GET route taking HEAD,
    answered by the same endpoint, dependencies and route class (so the same checks and errors), its body
    left out by the server. Starlette's own routes do this; FastAPI's do not, so a dialect's GET routes
    answered HEAD with a 405 whose Allow listed GET. The twins are left out of the OpenAPI document, and
    a path with a HEAD route already gets none, so calling this again adds nothing."""
    routed = [(route, route.methods or set()) for route in router.routes if isinstance(route, APIRoute)]
    heads = {route.path for route, methods in routed if "HEAD" in methods}
    for route, methods in routed:
        if "GET" in methods and route.path not in heads:
            heads.add(route.path)
            router.routes.append(
                type(route)(
                    route.path,
                    route.endpoint,
                    methods=["HEAD"],
                    name=route.name,
                    include_in_schema=False,
                    dependencies=route.dependencies,
                    response_model=route.response_model,
                    status_code=route.status_code,
                    response_class=route.response_class,
                    response_model_include=route.response_model_include,
                    response_model_exclude=route.response_model_exclude,
                    response_model_by_alias=route.response_model_by_alias,
                    response_model_exclude_unset=route.response_model_exclude_unset,
                    response_model_exclude_defaults=route.response_model_exclude_defaults,
                    response_model_exclude_none=route.response_model_exclude_none,
                    dependency_overrides_provider=route.dependency_overrides_provider,
                )
            )
