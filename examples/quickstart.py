"""Create a run over the generated stubs and watch it to the end.

EVALSVC_API_KEY=evk_... python examples/quickstart.py [HOST:PORT]
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc

from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, grader_pb2, item_pb2, run_pb2, target_pb2


async def main(target: str, api_key: str) -> int:
    auth = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        created = await runs.CreateRun(
            pb.CreateRunRequest(
                request_id="quickstart-1",  # retrying with the same id returns the same run
                display_name="capitals",
                items=[
                    item_pb2.Item(
                        input="Capital of France?",
                        expected_output="Paris",
                        response=item_pb2.Response(content="Paris", latency_ms=420),
                    ),
                    item_pb2.Item(
                        input="Capital of Spain?",
                        expected_output="Madrid",
                        response=item_pb2.Response(content="Barcelona", latency_ms=380),
                    ),
                ],
                target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
                graders=[
                    grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch(case_insensitive=True)),
                    grader_pb2.Grader(name="fast", latency=grader_pb2.Latency(max_ms=500)),
                ],
                pass_threshold=75,
            ),
            metadata=auth,
        )
        print(f"created {created.run.id} with {created.job_count} jobs")
        async for event in runs.WatchRun(pb.WatchRunRequest(run_id=created.run.id, after_seq=0), metadata=auth):
            c = event.counts
            if event.HasField("result"):
                r = event.result
                print(f"#{event.seq} {r.item_id} {r.grader}: {run_pb2.ResultState.Name(r.state)} - {r.explanation}")
            elif event.HasField("run"):
                status = run_pb2.RunStatus.Name(event.run.status)
                print(f"#{event.seq} run {status} ({c.completed_evaluations}/{c.total_evaluations})")
        final = (await runs.GetRun(pb.GetRunRequest(run_id=created.run.id), metadata=auth)).run
        print(f"pass rate {final.aggregate.pass_rate:.0%}, overall passed: {final.overall_passed}")
        return 0


if __name__ == "__main__":
    api_key = os.environ.get("EVALSVC_API_KEY", "")
    if not api_key:
        sys.exit(
            "quickstart: set EVALSVC_API_KEY to an API key: the one `make run` printed at its first start, or a new one"
            " from `.venv/bin/evalsvc keys create --tenant default`"
        )
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    try:
        status = asyncio.run(main(target, api_key))
        sys.stdout.flush()  # a reader gone early (`| head`) shows here, not in Python's complaint at exit
    except grpc.aio.AioRpcError as error:
        hint = {
            grpc.StatusCode.UNAVAILABLE: f"is the server running at {target}? `make run` starts one",
            grpc.StatusCode.UNAUTHENTICATED: "check EVALSVC_API_KEY",
        }.get(error.code(), "")
        sys.exit(f"quickstart: {error.code().name}: {error.details()}" + (f"; {hint}" if hint else ""))
    except BrokenPipeError:  # stdout closed early: stop quietly with SIGPIPE's status, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit complains again
        status = 128 + 13
    sys.exit(status)
