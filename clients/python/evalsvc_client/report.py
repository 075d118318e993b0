"""`evalctl report RUN_ID --html FILE`: one self-contained HTML file about a finished (or running) run.

The file has its style inline and its chart as inline SVG: it opens offline, from an email or a CI artifact, and
refers to no other URL. It holds the run's summary, the pass rate of each grader, a histogram of the target's
latency per evaluated output, and the failing (and erroring) results with their output and explanation.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from evalsvc_client import pb
from evalsvc_client.export import listed_explanation, listed_output
from evalsvc_client.visible import for_xml

#: Failing results listed in full; the rest are counted (the JSONL export has them all).
MAX_FAILURES = 500
HISTOGRAM_BINS = 12

_STYLE = """
body {
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;
  color:#1d2330;
  background:#f6f7f9;
  margin:0;
}
main { max-width:1100px; margin:0 auto; padding:28px }
h1 { font-size:22px; margin:0 0 4px }
h2 { font-size:15px; margin:0 0 10px }
.sub { color:#6b7385; font-size:12.5px }
.card { background:#fff; border:1px solid #e3e6ec; border-radius:10px; padding:16px 18px; margin:16px 0 }
.stats { display:grid; grid-template-columns:repeat(5,1fr); gap:12px }
.stat .label { color:#6b7385; font-size:12px; text-transform:uppercase }
.stat .value { font-size:24px; font-weight:650 }
.ok { color:#2f9e44 }
.bad { color:#e03131 }
.warn { color:#f08c00 }
table { width:100%; border-collapse:collapse }
th {
  text-align:left;
  font-size:12px;
  color:#6b7385;
  text-transform:uppercase;
  padding:6px 8px;
  border-bottom:1px solid #e3e6ec;
}
td { padding:6px 8px; border-bottom:1px solid #f0f2f5; vertical-align:top }
.num { text-align:right; font-variant-numeric:tabular-nums }
.badge { padding:3px 10px; border-radius:999px; font-size:12px; font-weight:600; background:#e9ecef }
.meter {
  display:inline-block;
  width:120px;
  height:8px;
  background:#edf0f4;
  border-radius:4px;
  overflow:hidden;
  vertical-align:middle;
  margin-right:8px;
}
.meter span { display:block; height:100%; background:#2f9e44 }
pre { white-space:pre-wrap; margin:0; font:12px/1.4 ui-monospace,Menlo,monospace }
"""


@dataclass
class _Tally:
    passed: int = 0
    failed: int = 0
    errored: int = 0
    scores: list[float] = field(default_factory=list)


def format_rate(rate: float | None) -> str:
    """A pass rate in percent to one decimal, halves rounded up as the run pages do (81.25 -> 81.3%); - for none."""
    return "-" if rate is None else f"{math.floor(rate * 10 + 0.5) / 10:.1f}%"


def _percent(passed: int, failed: int) -> str:
    graded = passed + failed
    return format_rate(100.0 * passed / graded if graded else None)


def _status(run: pb.Run) -> str:
    return pb.run.RunStatus.Name(run.status).removeprefix("RUN_STATUS_")


def _histogram(latencies: list[float]) -> str:
    """An inline SVG bar chart of latencies (ms) in HISTOGRAM_BINS equal bins."""
    if not latencies:
        return '<p class="sub">No latencies recorded.</p>'
    low, high = min(latencies), max(latencies)
    width = (high - low) / HISTOGRAM_BINS or 1.0
    bins = [0] * HISTOGRAM_BINS
    for value in latencies:
        bins[min(HISTOGRAM_BINS - 1, int((value - low) / width))] += 1
    tallest = max(bins)
    bar_w, chart_h = 60, 160
    bars = []
    for index, count in enumerate(bins):
        height = 0 if not count else max(2, round(chart_h * count / tallest))
        x = index * bar_w
        start = low + index * width
        bars.append(
            f'<rect x="{x + 4}" y="{chart_h - height + 16}" width="{bar_w - 8}" height="{height}" fill="#5c7cfa">'
            f"<title>{start:.0f}\u2013{start + width:.0f} ms: {count}</title></rect>"
            f'<text x="{x + bar_w / 2}" y="{chart_h - height + 12}" font-size="11" text-anchor="middle">'
            f"{count or ''}</text>"
            f'<text x="{x + bar_w / 2}" y="{chart_h + 32}" font-size="10" text-anchor="middle" fill="#6b7385">'
            f"{start:.0f}</text>"
        )
    total_w = bar_w * HISTOGRAM_BINS
    return (
        f'<svg viewBox="0 0 {total_w} {chart_h + 40}" width="100%"'
        f' role="img" aria-label="latency histogram">{"".join(bars)}</svg>'
        f'<p class="sub">Target latency per output, ms (bin starts); {len(latencies)} outputs,'
        f" {low:.0f}\u2013{high:.0f} ms.</p>"
    )


def _stat(label: str, value_html: str) -> str:
    return f'<div class="stat"><div class="label">{label}</div><div class="value">{value_html}</div></div>'


def agreement_line(agreement: pb.run.HumanAgreement) -> str:
    """A grader's agreement with people's verdicts, in words (evalctl and the report say it alike)."""
    compared = (
        agreement.both_passed
        + agreement.both_failed
        + agreement.grader_passed_person_failed
        + agreement.grader_failed_person_passed
    )
    if not compared:  # every result with a person's verdict errored
        return f"was compared with people on no output ({agreement.errored} with a verdict errored)"
    return (
        f"agrees with people on {100 * agreement.accuracy:.1f}% of {compared} compared outputs"
        f" (Cohen's kappa {agreement.cohen_kappa:.2f}; passed {agreement.grader_passed_person_failed} that people"
        f" failed, failed {agreement.grader_failed_person_passed} that people passed)"
    )


def _esc(text: str) -> str:
    """Text for the page: HTML-escaped, with the characters HTML (and XML 1.0) forbids spelled out (`\\x1b`, as
    in the JUnit file): a browser showed an output's ANSI colours as nothing, or as boxes, and a validator or an
    XHTML reader refused the page."""
    return html.escape(for_xml(text))


def _agreement_card(run: pb.Run) -> str:
    """The graders' agreement with people's verdicts (Item.human_verdicts), when any result had one."""
    rows = "".join(
        f"<li><b>{_esc(grader.grader)}</b> {_esc(agreement_line(grader.agreement))}</li>"
        for grader in run.aggregate.graders
        if grader.HasField("agreement")
    )
    return f'<div class="card"><h2>Agreement with people</h2><ul>{rows}</ul></div>' if rows else ""


def render_html(run: pb.Run, results: Iterable[pb.Result]) -> str:
    """The report page of a run and its results."""
    tallies: dict[str, _Tally] = {grader.name: _Tally() for grader in run.graders}
    latencies: dict[tuple[str, int], float] = {}
    failures: list[pb.Result] = []
    failure_count = 0
    for result in results:
        tally = tallies.setdefault(result.grader, _Tally())
        if result.state == pb.run.RESULT_STATE_PASSED:
            tally.passed += 1
        elif result.state == pb.run.RESULT_STATE_FAILED:
            tally.failed += 1
        elif result.state == pb.run.RESULT_STATE_ERROR:
            tally.errored += 1
        if result.state in (pb.run.RESULT_STATE_PASSED, pb.run.RESULT_STATE_FAILED):
            tally.scores.append(result.score)
        if result.state != pb.run.RESULT_STATE_SKIPPED and result.latency_ms:
            latencies.setdefault((result.item_id, result.repetition), result.latency_ms)
        if result.state in (pb.run.RESULT_STATE_FAILED, pb.run.RESULT_STATE_ERROR):
            failure_count += 1
            if len(failures) < MAX_FAILURES:
                failures.append(result)
    counts = run.counts
    esc = _esc
    verdict = ""
    if run.HasField("overall_passed"):
        verdict = '<span class="ok">passed</span>' if run.overall_passed else '<span class="bad">did not pass</span>'
    latency = run.aggregate.latency
    cost = run.cost_usd  # target and judges, so far (the aggregate has them only once the run ended)
    threshold = f"{run.pass_threshold:g}%" if run.HasField("pass_threshold") else "every evaluation"
    errors_allowed = f"{run.max_error_rate:g}%" if run.HasField("max_error_rate") else "none"
    grader_rows = "".join(
        f"<tr><td>{esc(name)}</td><td><span class='meter'><span style='width:"
        f"{0 if not t.passed + t.failed else 100 * t.passed / (t.passed + t.failed):.1f}%'></span></span>"
        f"{_percent(t.passed, t.failed)}</td><td class='num'>{t.passed}</td><td class='num'>{t.failed}</td>"
        f"<td class='num'>{t.errored}</td>"
        f"<td class='num'>{(sum(t.scores) / len(t.scores)) if t.scores else 0:.2f}</td></tr>"
        for name, t in tallies.items()
    )
    failure_rows = "".join(
        f"<tr><td>{esc(r.item_id)}</td><td class='num'>{r.repetition}</td><td>{esc(r.grader)}</td>"
        f"<td>{esc(pb.run.ResultState.Name(r.state).removeprefix('RESULT_STATE_'))}</td>"
        f"<td class='num'>{r.score:.2f}</td><td><pre>{esc(listed_output(r))}</pre></td>"
        f"<td>{esc(r.error_reason or listed_explanation(r))}</td></tr>"
        for r in failures
    )
    more = (
        f'<p class="sub">{failure_count - len(failures)} more not shown; '
        f"<code>evalctl results {esc(run.id)} --state failed</code> lists them all.</p>"
        if failure_count > len(failures)
        else ""
    )
    created = run.create_time.ToDatetime().isoformat(timespec="seconds") + "Z" if run.HasField("create_time") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(run.display_name or run.id)} · evalsvc report</title><style>{_STYLE}</style></head>
<body><main>
<h1>{esc(run.display_name or run.id)}</h1>
<p class="sub"><code>{esc(run.id)}</code> · created {created} · <span class="badge">{_status(run)}</span> {verdict}
 · passes at {threshold}, errors allowed: {errors_allowed}</p>
<div class="card stats">
{_stat("Pass rate", _percent(counts.passed, counts.failed))}
{_stat("Evaluations", f"{counts.completed_evaluations} / {counts.total_evaluations}")}
{_stat("Passed / failed", f'<span class="ok">{counts.passed}</span> / <span class="bad">{counts.failed}</span>')}
{_stat("Errors", f'<span class="warn">{counts.errored}</span>')}
{_stat("Cost", f"${cost:.4f}")}
</div>
<div class="card"><h2>Graders</h2><table><thead><tr><th>Grader</th><th>Pass rate</th><th class="num">Passed</th>
<th class="num">Failed</th><th class="num">Errors</th><th class="num">Mean score</th></tr></thead>
<tbody>{grader_rows}</tbody></table></div>
{_agreement_card(run)}
<div class="card"><h2>Latency</h2><p class="sub">p50 {latency.p50_ms:.0f} ms · p95 {latency.p95_ms:.0f} ms ·
p99 {latency.p99_ms:.0f} ms · mean {latency.mean_ms:.0f} ms</p>{_histogram(sorted(latencies.values()))}</div>
<div class="card"><h2>Failing results ({failure_count})</h2>
{"<p class='sub'>None.</p>" if not failure_count else ""}
<table{" hidden" if not failure_count else ""}><thead><tr><th>Item</th><th class="num">Rep</th><th>Grader</th>
<th>State</th><th class="num">Score</th><th>Output</th><th>Explanation</th></tr></thead>
<tbody>{failure_rows}</tbody></table>
{more}</div>
</main></body></html>
"""
