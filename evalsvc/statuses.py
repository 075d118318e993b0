"""Which run statuses are terminal and which are active: written once, for every layer.

A leaf module (it imports only the generated contract), so the store, the services, the event
watchers and the REST gateway all read the same two tuples. Tuples rather than sets: the store
passes them to SQL `IN` and to parameters typed as sequences; membership among three small ints
costs the same either way.
"""

from __future__ import annotations

from evalsvc.v1 import run_pb2

# A run that may still change: waiting to be claimed, or executing.
ACTIVE = (run_pb2.RUN_STATUS_PENDING, run_pb2.RUN_STATUS_RUNNING)
# A run that has finished for good: it never changes status again and its last event is written.
TERMINAL = (run_pb2.RUN_STATUS_SUCCEEDED, run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_CANCELLED)
