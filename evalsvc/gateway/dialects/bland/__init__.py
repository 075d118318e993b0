"""Bland AI's Evals API (eval agents and experiments) translated to evalsvc.

Bland scores recorded phone calls with "eval agents" (LLM judges that pick one of a set of levels).
Here an eval agent is a saved grader (GraderService) holding an `LlmJudge` in MODE_LEVELS, each
agent version a grader version; a call is an item of one per-tenant dataset, its transcript the
item's recorded response (graded by the `provided` target); an experiment is a run over some of
those items with one saved-grader reference per attached agent. Vendor fields with no evalsvc
equivalent are kept in run annotations, item metadata, or the agent version's own record (see
`translate.encode_version`). docs/dialects/bland.md maps every field.

Every response is `{"data": ..., "errors": null}`; every error `{"data": null, "errors": [{"error",
"message"}]}` (Bland documents only the success envelope; the error shape is inferred).

The package: `models` (Bland's wire shapes), `translate` (those shapes to and from evalsvc's messages,
pure), `routes` (the client's calls and the route declarations).
"""

from evalsvc.gateway.dialects.base import Dialect, VendorOptions
from evalsvc.gateway.dialects.bland.models import ERROR_RESPONSES
from evalsvc.gateway.dialects.bland.routes import Bland, bland_key, routes
from evalsvc.gateway.dialects.bland.translate import NAME, render

DIALECT = Dialect(
    name=NAME,
    title="Bland AI Evals",
    prefix="",
    client=Bland,
    routes=routes,
    vendor=VendorOptions(
        error_handler=render,
        caller=bland_key,
        key_of=bland_key,
        key_help="send it as 'authorization: <key>'",
        error_responses=ERROR_RESPONSES,
        service_not_found=True,
    ),
)
