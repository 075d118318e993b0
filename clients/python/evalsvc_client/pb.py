"""The generated message modules, re-exported: `from evalsvc_client import pb; pb.runs.CreateRunRequest(...)`.

`pb.comparison` holds CompareRuns' and ListComparisonItems' messages, `pb.cache` the CacheMode enum.
`pb.grader` and `pb.target` hold the Grader and Target messages; `pb.graders` and `pb.targets` the GraderService
and TargetService requests and the saved definitions (`pb.SavedGrader`, `pb.SavedTarget`); `pb.webhooks` the
WebhookService requests, `pb.Webhook` and `pb.WebhookDelivery`; `pb.secrets` the SecretService requests and
`pb.Secret` (a name and when it was set, never a value)."""

from evalsvc_client._gen.evalsvc.v1 import cache_pb2 as cache
from evalsvc_client._gen.evalsvc.v1 import comparison_pb2 as comparison
from evalsvc_client._gen.evalsvc.v1 import dataset_service_pb2 as datasets
from evalsvc_client._gen.evalsvc.v1 import eval_run_service_pb2 as runs
from evalsvc_client._gen.evalsvc.v1 import grader_pb2 as grader
from evalsvc_client._gen.evalsvc.v1 import grader_service_pb2 as graders
from evalsvc_client._gen.evalsvc.v1 import item_pb2 as item
from evalsvc_client._gen.evalsvc.v1 import run_pb2 as run
from evalsvc_client._gen.evalsvc.v1 import secret_service_pb2 as secrets
from evalsvc_client._gen.evalsvc.v1 import target_pb2 as target
from evalsvc_client._gen.evalsvc.v1 import target_service_pb2 as targets
from evalsvc_client._gen.evalsvc.v1 import webhook_service_pb2 as webhooks

Run = run.Run
Result = run.Result
RunStatus = run.RunStatus
ResultState = run.ResultState
RunCounts = run.RunCounts
Item = item.Item
Response = item.Response
Grader = grader.Grader
Target = target.Target
Dataset = datasets.Dataset
SavedGrader = graders.SavedGrader
SavedTarget = targets.SavedTarget
WatchRunResponse = runs.WatchRunResponse
RunComparison = comparison.RunComparison
ComparisonItem = comparison.ComparisonItem
Webhook = webhooks.Webhook
WebhookDelivery = webhooks.WebhookDelivery
Secret = secrets.Secret

TERMINAL_STATUSES = frozenset({run.RUN_STATUS_SUCCEEDED, run.RUN_STATUS_FAILED, run.RUN_STATUS_CANCELLED})

__all__ = [
    "TERMINAL_STATUSES",
    "ComparisonItem",
    "Dataset",
    "Grader",
    "Item",
    "Response",
    "Result",
    "ResultState",
    "Run",
    "RunComparison",
    "RunCounts",
    "RunStatus",
    "SavedGrader",
    "SavedTarget",
    "Secret",
    "Target",
    "WatchRunResponse",
    "Webhook",
    "WebhookDelivery",
    "cache",
    "comparison",
    "datasets",
    "grader",
    "graders",
    "item",
    "run",
    "runs",
    "secrets",
    "target",
    "targets",
    "webhooks",
]
