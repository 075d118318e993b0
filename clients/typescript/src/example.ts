// Creates a run over three recorded answers, watches it to the end printing progress, and resumes the watch
// from the last seq it saw when the stream drops (server restarted or killed). The same example as the Python
// and Go ones.
//
//   npm run build && EVALSVC_API_KEY=evk_... node dist/example.js 127.0.0.1:50051
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";

import { EvalRunService, type WatchRunResponse } from "./gen/evalsvc/v1/eval_run_service_pb.js";
import { RunStatus } from "./gen/evalsvc/v1/run_pb.js";

const target = process.argv[2] ?? process.env.EVALCTL_TARGET ?? "127.0.0.1:50051";
const apiKey = process.env.EVALSVC_API_KEY ?? "";
if (!apiKey) {
  // Without it every call fails UNAUTHENTICATED; say how to get one instead.
  console.error("example: set EVALSVC_API_KEY to an API key (`evalsvc keys create --tenant default --db <the server's --db>` makes one in its database)");
  process.exit(2);
}

// Every call carries `authorization: Bearer <key>`.
const auth: Interceptor = (next) => (req) => {
  req.header.set("authorization", `Bearer ${apiKey}`);
  return next(req);
};

const transport = createGrpcTransport({ baseUrl: `http://${target}`, interceptors: [auth] });
const client = createClient(EvalRunService, transport);

const TERMINAL = new Set([RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED]);

// Ctrl-C aborts the calls (the run goes on on the server); an aborted watch is not resumed.
const interrupt = new AbortController();
process.once("SIGINT", () => interrupt.abort());

// Whether a failed watch stream is resumed. A server that went away without a goodbye (kill -9, a crash) drops
// the HTTP/2 connection, which connect-node reports as Canceled ("http/2 stream closed with error code CANCEL"),
// the same code as the caller's own abort: that one alone is not resumed.
function resumable(err: ConnectError): boolean {
  if (err.code === Code.Canceled) return !interrupt.signal.aborted;
  return [Code.Unavailable, Code.DeadlineExceeded, Code.ResourceExhausted].includes(err.code);
}

function statusName(status: RunStatus): string {
  return RunStatus[status] ?? String(status);
}

async function main(): Promise<void> {
  const answers: Array<[string, string, string]> = [
    ["What is 2+2?", "4", "4"],
    ["Capital of France?", "Paris", "Paris"],
    ["Largest planet?", "Jupiter", "Saturn"],
  ];
  const { run, jobCount } = await client.createRun(
    {
      requestId: randomUUID(), // retries with the same request_id return the same run
      displayName: "example",
      items: answers.map(([input, expected, got], i) => ({
        id: `item-${i + 1}`,
        input,
        expectedOutput: expected,
        response: { content: got },
      })),
      target: { kind: { case: "provided", value: {} } },
      graders: [{ name: "exact", kind: { case: "exactMatch", value: {} } }],
    },
    { timeoutMs: 10_000, signal: interrupt.signal },
  );
  if (!run) throw new Error("CreateRun returned no run");
  console.log(`created ${run.id} with ${jobCount} jobs`);

  let lastSeq = 0n; // int64 fields are bigint
  let final = run;
  for (let failures = 0; ; ) {
    try {
      for await (const event of client.watchRun({ runId: run.id, afterSeq: lastSeq }, { signal: interrupt.signal })) {
        failures = 0;
        if (event.event.case === "heartbeat" || event.seq <= lastSeq) continue;
        lastSeq = event.seq;
        print(event);
        if (event.event.case === "run") final = event.event.value;
      }
      break; // the stream ends OK after the terminal event
    } catch (err) {
      if (!resumable(ConnectError.from(err)) || ++failures > 30) throw err;
      await sleep(Math.min(2000, 50 * 2 ** failures));
    }
  }
  if (!TERMINAL.has(final.status)) throw new Error(`watch ended before the run did: ${statusName(final.status)}`);
  const rate = (final.aggregate?.passRate ?? 0) * 100;
  console.log(`pass rate ${rate.toFixed(0)}%, overall passed: ${final.overallPassed ?? false}`);
}

function print(event: WatchRunResponse): void {
  const c = event.counts;
  const progress = `(${c?.completedEvaluations ?? 0}/${c?.totalEvaluations ?? 0})`;
  if (event.event.case === "run") {
    console.log(`#${event.seq} run ${statusName(event.event.value.status)} ${progress}`);
  } else if (event.event.case === "result") {
    const r = event.event.value;
    console.log(`#${event.seq} ${r.itemId} ${r.grader}: ${r.passed ? "PASSED" : "FAILED"} ${progress}`);
  }
}

main().catch((err: unknown) => {
  if (interrupt.signal.aborted) {
    console.error("example: interrupted; the run goes on on the server");
    process.exit(130);
  }
  console.error(err instanceof ConnectError ? `${Code[err.code]}: ${err.rawMessage}` : err);
  process.exit(1);
});
