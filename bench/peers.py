"""Peers on the same work: promptfoo and Inspect AI against evalsvc on 10,000 items.

The question a user asks is "how much faster is this than running the tool I would otherwise use",
so each peer does what evalsvc does in its large run, in its most direct form: outputs that need no
model (promptfoo's `echo` provider, Inspect's `mockllm/model`), one exact comparison per item
(`equals`, `exact()`), results persisted the way the tool persists them. evalsvc runs the same
10,000 items with recorded responses and an exact_match grader, timed from the client's CreateRun to
the terminal event. Wall times are of the whole command, start-up included, as a user waits for it.

Peers are benchmark-only and installed on first use into bench/peers/ (npm for promptfoo and
js-tiktoken, a venv of its own for Inspect AI), pinned by bench/peers/package-lock.json and
bench/peers/requirements.txt. They run with no network (`unshare -n`): promptfoo reports telemetry
even with it disabled, and Inspect's mockllm fetches tiktoken's o200k_base file, which is rebuilt
here from js-tiktoken's copy and checked against tiktoken's own SHA-256. Anything that cannot be
installed or run becomes a "skipped" row with the reason, never a failed suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import procs

if TYPE_CHECKING:
    from bench.run import Suite

PEERS = procs.ROOT / "bench" / "peers"
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # tiktoken_ext/openai_public.py
INSTALL_TIMEOUT_S = 900
RUN_TIMEOUT_S = 900

# Wraps a command to report its peak RSS: RUSAGE_CHILDREN of a fresh process covers only that command.
MAXRSS = (
    "import resource, subprocess, sys, json\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
    "print(json.dumps({'code': code, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def _run(argv: list[str], *, cwd: Path, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run a setup command; '' on success, else the reason (its last line of output)."""
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]}: {exc}"
    if done.returncode == 0:
        return ""
    tail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
    return f"{' '.join(argv[:3])} exited {done.returncode}: {tail[-1] if tail else ''}"[:300]


def ensure_node_peers() -> str:
    """Install promptfoo and js-tiktoken into bench/peers/node_modules; '' when ready, else why not."""
    if (PEERS / "node_modules" / ".bin" / "promptfoo").exists():
        return ""
    if shutil.which("npm") is None:
        return "npm is not installed"
    # `npm install --no-save`, not `npm ci`: the registry here lacks some platforms' optional packages,
    # which ci rejects as a lockfile mismatch; --no-save keeps the lockfile as committed.
    argv = ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error"]
    return _run(argv, cwd=PEERS, timeout_s=INSTALL_TIMEOUT_S)


def ensure_inspect() -> str:
    """Install Inspect AI into bench/peers/.venv; '' when ready, else why not."""
    venv = PEERS / ".venv"
    if (venv / "bin" / "inspect").exists():
        return ""
    why = _run([sys.executable, "-m", "venv", str(venv)], cwd=PEERS, timeout_s=120)
    if why:
        return why
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", "requirements.txt"]
    return _run(pip, cwd=PEERS, timeout_s=INSTALL_TIMEOUT_S)


def tiktoken_cache() -> Path:
    """A TIKTOKEN_CACHE_DIR holding o200k_base, rebuilt from js-tiktoken and verified by checksum."""
    source = PEERS / "node_modules" / "js-tiktoken" / "dist" / "ranks" / "o200k_base.js"
    text = source.read_text()
    ranks = json.loads(text[text.index("{") : text.rindex("}") + 1])["bpe_ranks"]
    lines = []
    for group in ranks.split("\n"):
        if group:
            _, offset, *tokens = group.split(" ")
            lines += [f"{token} {int(offset) + i}" for i, token in enumerate(tokens)]
    contents = ("\n".join(lines) + "\n").encode()
    digest = hashlib.sha256(contents).hexdigest()
    if digest != O200K_SHA256:
        raise RuntimeError(f"rebuilt o200k_base has SHA-256 {digest}, expected {O200K_SHA256}")
    cache = procs.TMP / "tiktoken"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / hashlib.sha1(O200K_URL.encode()).hexdigest()).write_bytes(contents)
    return cache


def _offline(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run a peer with no network; (wall seconds, peak RSS MB). Raises on a non-zero exit."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MAXRSS, "unshare", "-n", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    elapsed = time.perf_counter() - started
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    if report["code"] != 0:
        raise RuntimeError(f"{argv[0]} exited {report['code']}: {done.stderr.decode(errors='replace')[-300:]}")
    return elapsed, report["maxrss_kib"] / 1024


def promptfoo(items: int, workdir: Path) -> tuple[float, float]:
    """promptfoo eval: echo provider, one `equals` assertion per test, no cache, telemetry off."""
    workdir.mkdir(parents=True, exist_ok=True)
    tests = [
        {"vars": {"answer": f"answer {i}"}, "assert": [{"type": "equals", "value": f"answer {i}"}]}
        for i in range(items)
    ]
    config = {"description": "evalsvc bench", "prompts": ["{{answer}}"], "providers": ["echo"], "tests": tests}
    (workdir / "promptfooconfig.json").write_text(json.dumps(config))
    env = dict(os.environ)
    env.update(
        PROMPTFOO_DISABLE_TELEMETRY="1",
        PROMPTFOO_DISABLE_UPDATE="1",
        PROMPTFOO_CONFIG_DIR=str(workdir / "home"),
        NO_COLOR="1",
    )
    binary = str(PEERS / "node_modules" / ".bin" / "promptfoo")
    argv = [binary, "eval", "-c", "promptfooconfig.json", "--no-cache", "--no-table", "--no-progress-bar"]
    return _offline(argv, workdir, env)


INSPECT_TASK = '''"""10,000 items through mockllm with an exact() scorer: Inspect AI's side of the bench."""

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import exact
from inspect_ai.solver import generate


@task
def bench(n: int = 10000) -> Task:
    samples = [Sample(input=f"answer {i}", target=f"answer {i}") for i in range(n)]
    return Task(dataset=MemoryDataset(samples), solver=generate(), scorer=exact())
'''


def inspect_ai(items: int, workdir: Path, cache: Path) -> tuple[float, float]:
    """inspect eval with mockllm/model and exact(), logs written as usual, no display."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "bench_task.py").write_text(INSPECT_TASK)
    env = dict(os.environ)
    env.update(INSPECT_LOG_DIR=str(workdir / "logs"), TIKTOKEN_CACHE_DIR=str(cache), NO_COLOR="1")
    binary = str(PEERS / ".venv" / "bin" / "inspect")
    argv = [binary, "eval", "bench_task.py", "--model", "mockllm/model", "--display", "none", "-T", f"n={items}"]
    return _offline(argv, workdir, env)


def evalsvc_items(items: int, name: str) -> tuple[float, float]:
    """The same items through evalsvc (recorded responses, one exact_match grader, fresh server):
    (items/s from CreateRun to the terminal event, peak server RSS MB)."""
    with procs.evalsvc_server(procs.sqlite_url(name), name) as srv:
        args: dict[str, Any] = {"mode": "large", **srv.target(), "items": items, "graders": 1, "timeout_s": 300}
        result = procs.run_child("bench.loadgen", args, timeout_s=330)
        peak = srv.hwm_kib() / 1024
    if result["results"] != items:
        raise RuntimeError(f"evalsvc recorded {result['results']} of {items} results")
    return items / float(result["e2e_s"]), peak


def run(suite: Suite) -> None:
    """Add the peers' rows: each peer's items/s as the baseline of evalsvc's, measured back to back."""
    items = suite.config.peer_items
    peers: dict[str, str] = {}
    if suite.config.quick:  # a smoke run installs nothing: it uses the peers a full run installed
        missing = "not installed (quick mode installs nothing; a full `--only peers` run installs it)"
        peers["promptfoo"] = "" if (PEERS / "node_modules" / ".bin" / "promptfoo").exists() else missing
        peers["Inspect AI"] = "" if (PEERS / ".venv" / "bin" / "inspect").exists() else missing
    else:
        why_node = ensure_node_peers()
        peers["promptfoo"] = why_node
        peers["Inspect AI"] = why_node or ensure_inspect()
    if shutil.which("unshare") is None:
        peers = dict.fromkeys(peers, "unshare is not available to cut the network")
    cache: Path | None = None
    if not peers["Inspect AI"]:
        try:
            cache = tiktoken_cache()
        except (OSError, RuntimeError, ValueError) as exc:
            peers["Inspect AI"] = f"cannot rebuild o200k_base offline: {exc}"
    rows = {}
    for name, why in peers.items():
        if why:
            suite.row("peers", f"{name} on {items:,} items", "", note=f"skipped: {why}")
            continue
        rows[name] = (
            suite.row(
                "peers",
                f"{items:,} items, exact match: evalsvc items/s vs {name} items/s",
                "items/s",
                baseline_label=name,
                # Issue 16's target is against promptfoo, the faster peer, on 10,000 items: at quick mode's
                # 500 the peers' start-up dominates their time, so no target is checked there.
                target=">= 50 ratio" if name == "promptfoo" and not suite.config.quick else "",
            ),
            suite.row(
                "peers", f"{items:,} items: evalsvc server peak RSS vs {name} peak RSS, MB", "MB", baseline_label=name
            ),
        )
    if not rows:
        return
    for rep in range(suite.config.reps):
        ours, ours_mb = evalsvc_items(items, f"peers-{rep}")
        for name, (speed, memory) in rows.items():
            workdir = procs.TMP / f"peer-{name.split()[0].lower()}-{rep}"
            try:
                if name == "promptfoo":
                    seconds, peak = promptfoo(items, workdir)
                else:
                    assert cache is not None
                    seconds, peak = inspect_ai(items, workdir, cache)
            except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
                speed.note = f"failed: {str(exc)[:200]}"
                continue
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            speed.add(ours, items / seconds)
            memory.add(ours_mb, peak)
            print(
                f"[bench] peers rep {rep + 1}: {name} {items / seconds:.0f} items/s ({peak:.0f} MB), "
                f"evalsvc {ours:.0f} items/s ({ours_mb:.0f} MB)",
                file=sys.stderr,
                flush=True,
            )
