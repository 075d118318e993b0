// evalsvc run pages: /ui/runs, /ui/runs/{run_id} and /ui/compare?baseline=&candidate=. Everything comes from this gateway's JSON API
// (/v1/...), called with the API key kept in sessionStorage and sent as the authorization header.
"use strict";

const KEY_STORAGE = "evalsvc.apiKey";
const TERMINAL = new Set(["RUN_STATUS_SUCCEEDED", "RUN_STATUS_FAILED", "RUN_STATUS_CANCELLED"]);
const MAX_ROWS = 2000; // results kept in the table; `evalctl results RUN_ID` lists them all
const MAX_RECONNECTS = 30; // watch failures in a row before giving up (any event resets the count)

const $ = (id) => document.getElementById(id);

// ---- the API key: from the fragment once, then sessionStorage; never in a URL the server sees ----

function takeKeyFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get("key");
  if (key) {
    sessionStorage.setItem(KEY_STORAGE, key.trim());
    history.replaceState(null, "", location.pathname + location.search); // out of the address bar and history
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// The key form, the same on every page.
function buildKeyPanel() {
  const input = element("input", { id: "key-input", type: "password", placeholder: "evk_...", spellcheck: "false", required: "" });
  $("key-panel").replaceChildren(
    element("h1", { text: "API key" }),
    element(
      "p",
      {},
      "These pages show your tenant's runs. Paste an API key (",
      element("code", { text: "evk_..." }),
      "): it stays in this tab only and is sent to this server as a header. ",
      element("code", { text: "evalsvc keys create --tenant NAME" }),
      " makes one.",
    ),
    element("form", { id: "key-form", autocomplete: "off" }, input, element("button", { type: "submit", text: "Open" })),
    element("p", { class: "error", id: "key-error", hidden: "" }),
  );
}

function showKeyForm(message) {
  $("content").hidden = true;
  $("forget-key").hidden = true;
  $("key-panel").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  $("key-input").focus();
}

function setUpKeyControls(start) {
  buildKeyPanel();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-input").value = "";
    start();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    location.reload();
  });
}

function showContent() {
  $("key-panel").hidden = true;
  $("content").hidden = false;
  $("forget-key").hidden = false;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
  }
}

function headers(extra) {
  return Object.assign({ authorization: `Bearer ${apiKey()}`, accept: "application/json" }, extra || {});
}

async function api(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function handleError(error) {
  if (error instanceof ApiError && error.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyForm(`The key was refused: ${error.message}`);
    return;
  }
  const box = $("error");
  box.hidden = false;
  box.textContent =
    error instanceof ApiError && error.status === 404
      ? "There is no such run for this key's tenant."
      : `Could not load: ${error.message}`;
}

// ---- formatting ----

function statusName(status) {
  return (status || "RUN_STATUS_UNSPECIFIED").replace("RUN_STATUS_", "");
}

function stateName(state) {
  return (state || "").replace("RESULT_STATE_", "");
}

function percent(passed, failed) {
  const graded = passed + failed;
  if (!graded) return "–";
  const value = Math.floor((1000 * passed) / graded + 0.5) / 10; // one decimal, halves up (evalctl does the same)
  return Number.isInteger(value) ? `${value}%` : `${value.toFixed(1)}%`;
}

function money(value) {
  return `$${(value || 0).toFixed(value >= 1 ? 2 : 4)}`;
}

function millis(value) {
  if (value === undefined || value === null || Number.isNaN(value)) return "–";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
}

function when(timestamp) {
  if (!timestamp) return "";
  return new Date(timestamp).toLocaleString();
}

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function badge(status) {
  const name = statusName(status);
  return element("span", { class: `badge ${name.toLowerCase()}`, text: name });
}

function runHref(runId) {
  return `/ui/runs/${encodeURIComponent(runId)}`;
}

function compareHref(baselineRunId, candidateRunId) {
  return `/ui/compare?${new URLSearchParams({ baseline: baselineRunId, candidate: candidateRunId })}`;
}

function targetKind(target) {
  if (!target) return "";
  for (const kind of ["provided", "echo", "chat", "http"]) if (target[kind]) return kind;
  return target.savedTargetId ? "saved target" : "";
}

// Nearest rank, as the server's aggregate computes it (evalsvc/execution/aggregate.py): the page showed
// another p50 than the API and the HTML report for the same run.
function quantile(sorted, q) {
  if (!sorted.length) return NaN;
  return sorted[Math.max(1, Math.ceil(q * sorted.length)) - 1];
}

// ---- /ui/runs ----

function runsPage() {
  let nextToken = "";
  let refreshTimer = 0;

  function row(run) {
    const counts = run.counts || {};
    const total = counts.totalEvaluations || 0;
    const done = counts.completedEvaluations || 0;
    const link = element("a", { href: runHref(run.id) }, run.displayName || run.id);
    const bar = element("div", { class: "mini-progress" }, element("div", { style: `width:${total ? (100 * done) / total : 0}%` }));
    return element(
      "tr",
      { "data-run-id": run.id },
      element("td", {}, link, element("div", { class: "sub", text: run.id })),
      element("td", {}, badge(run.status)),
      element("td", {}, bar, element("div", { class: "sub", text: `${done} / ${total}` })),
      element("td", { class: "num", text: percent(counts.passed || 0, counts.failed || 0) }),
      element("td", { class: "num", text: money(run.costUsd) }),
      element("td", { text: when(run.createTime) }),
    );
  }

  async function load(append) {
    const query = new URLSearchParams({ page_size: "50" });
    if (append && nextToken) query.set("page_token", nextToken);
    const page = await api(`/v1/runs?${query}`);
    const body = $("runs-body");
    if (!append) body.replaceChildren();
    for (const run of page.runs || []) body.append(row(run));
    nextToken = page.nextPageToken || "";
    $("more").hidden = !nextToken;
    $("runs-empty").hidden = body.children.length > 0;
    const active = (page.runs || []).some((run) => !TERMINAL.has(run.status));
    $("live-state").textContent = active ? "refreshing every 5 s" : "";
    clearTimeout(refreshTimer);
    if (active && !append) refreshTimer = setTimeout(() => load(false).catch(handleError), 5000);
  }

  $("more").addEventListener("click", () => load(true).catch(handleError));
  return () => {
    showContent();
    load(false).catch(handleError);
  };
}

// ---- /ui/runs/{run_id} ----

function runPage() {
  const runId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const state = {
    about: {}, // the run as GetRun gave it first: its name, target and settings
    run: null, // the run as of the last run event shown: status, verdict, aggregate (counts stay in step)
    counts: {},
    lastSeq: 0,
    graders: new Map(), // name -> {passed, failed, errored, scoreSum, scored}
    outputs: new Map(), // "item/rep" -> {latency, cost}: a target call's figures, once per evaluation set
    scoringCost: 0,
    rows: [],
    filter: "",
    finished: false,
  };
  let renderQueued = false;

  $("crumb-run").textContent = runId;
  $("run-id").textContent = runId;
  document.title = `${runId} · evalsvc`;

  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  function renderSummary() {
    const about = state.about;
    const run = state.run || {};
    const counts = state.counts;
    const total = counts.totalEvaluations || 0;
    const done = counts.completedEvaluations || 0;
    $("run-name").textContent = about.displayName || runId;
    const status = $("status");
    status.textContent = state.run ? statusName(run.status) : "…";
    status.className = `badge ${statusName(run.status).toLowerCase()}`;
    const kind = targetKind(about.target);
    const meta = [
      kind && `target ${kind}`,
      about.createTime && `created ${when(about.createTime)}`,
      about.rerunOf && `rerun of ${about.rerunOf}`,
    ];
    if (about.passThreshold !== undefined) meta.push(`passes at ${about.passThreshold}%`);
    meta.push(`at most ${about.maxErrorRate || 0}% errors`);
    $("run-meta").textContent = meta.filter(Boolean).join(" · ");
    $("completed").textContent = String(done);
    $("total").textContent = String(total);
    $("percent-done").textContent = total ? `${Math.floor((100 * done) / total)}%` : "";
    $("progress").setAttribute("aria-valuemax", String(total));
    $("progress").setAttribute("aria-valuenow", String(done));
    for (const [name, count] of [
      ["passed", counts.passed],
      ["failed", counts.failed],
      ["errored", counts.errored],
      ["skipped", counts.skipped],
    ]) {
      $(`bar-${name}`).style.width = total ? `${(100 * (count || 0)) / total}%` : "0";
    }
    $("passed").textContent = String(counts.passed || 0);
    $("failed").textContent = String(counts.failed || 0);
    $("errored").textContent = String(counts.errored || 0);
    $("pass-rate").textContent = percent(counts.passed || 0, counts.failed || 0);
    $("verdict").textContent =
      run.overallPassed === undefined ? "" : run.overallPassed ? "the run passed" : "the run did not pass";
    $("verdict").className = `hint ${run.overallPassed === false ? "bad" : run.overallPassed ? "ok" : ""}`;
    const aggregate = state.finished ? run.aggregate : null;
    if (aggregate && aggregate.latency && aggregate.latency.p50Ms !== undefined && state.outputs.size === 0) {
      $("latency").textContent = `${millis(aggregate.latency.p50Ms)} / ${millis(aggregate.latency.p95Ms)}`;
    } else {
      // Outputs with a latency, as the server's figures (a failed target call's output has none).
      const latencies = [...state.outputs.values()]
        .map((o) => o.latency)
        .filter((ms) => ms > 0)
        .sort((a, b) => a - b);
      $("latency").textContent = latencies.length
        ? `${millis(quantile(latencies, 0.5))} / ${millis(quantile(latencies, 0.95))}`
        : "–";
    }
    const targetCost = [...state.outputs.values()].reduce((sum, o) => sum + o.cost, 0);
    const cost = aggregate ? (aggregate.totalCostUsd || 0) + (aggregate.scoringCostUsd || 0) : targetCost + state.scoringCost;
    $("cost").textContent = money(cost);
    const error = $("run-error");
    error.hidden = !run.error;
    error.textContent = run.error ? `${run.error.code}: ${run.error.message}` : "";
  }

  function renderGraders() {
    const body = $("graders-body");
    body.replaceChildren();
    const finalByName = new Map(((state.finished && state.run.aggregate && state.run.aggregate.graders) || []).map((g) => [g.grader, g]));
    const names = new Set([...(state.about.graders || []).map((g) => g.name), ...state.graders.keys()]);
    for (const name of names) {
      const tally = state.graders.get(name) || { passed: 0, failed: 0, errored: 0, scoreSum: 0, scored: 0 };
      const final = finalByName.get(name);
      const passed = final ? final.passed || 0 : tally.passed;
      const failed = final ? final.failed || 0 : tally.failed;
      const errored = final ? final.errored || 0 : tally.errored;
      const mean = final ? final.meanScore : tally.scored ? tally.scoreSum / tally.scored : undefined;
      const rate = passed + failed ? (100 * passed) / (passed + failed) : 0;
      const meter = element("div", { class: "meter" }, element("div", { style: `width:${rate}%` }));
      body.append(
        element(
          "tr",
          { "data-grader": name },
          element("td", { text: name }),
          element("td", { class: "rate" }, meter, element("span", { "data-field": "grader_pass_rate", text: percent(passed, failed) })),
          element("td", { class: "num", text: String(passed) }),
          element("td", { class: "num", text: String(failed) }),
          element("td", { class: "num", text: String(errored) }),
          element("td", { class: "num", text: mean === undefined ? "–" : mean.toFixed(2) }),
          element("td", { class: "num", "data-field": "grader_agreement", text: agreement(final && final.agreement) }),
        ),
      );
    }
  }

  // A grader's agreement with people's verdicts, once the run has ended: "90.0% of 10, κ 0.62".
  function agreement(a) {
    if (!a) return "–";
    const compared = (a.bothPassed || 0) + (a.bothFailed || 0) + (a.graderPassedPersonFailed || 0) + (a.graderFailedPersonPassed || 0);
    if (!compared) return `none compared (${a.errored || 0} errored)`;
    return `${(100 * (a.accuracy || 0)).toFixed(1)}% of ${compared}, κ ${(a.cohenKappa || 0).toFixed(2)}`;
  }

  function resultRow(result) {
    const state_ = stateName(result.state);
    return element(
      "tr",
      { "data-state": result.state },
      element("td", { text: result.itemId }),
      element("td", { class: "num", text: String(result.repetition || 0) }),
      element("td", { text: result.grader }),
      element("td", {}, element("span", { class: `pill ${state_.toLowerCase()}`, text: state_ })),
      element("td", { class: "num", text: (result.score || 0).toFixed(2) }),
      element("td", { class: "num", text: millis(result.latencyMs || 0) }),
      element("td", { class: "explanation", text: result.errorReason || result.explanation || "" }),
    );
  }

  function renderResults() {
    const shown = state.rows.filter((r) => !state.filter || r.state === state.filter);
    const body = $("results-body");
    body.replaceChildren(...shown.slice(-500).reverse().map(resultRow)); // newest first
    $("results-empty").hidden = shown.length > 0;
    $("results-empty").textContent = state.rows.length ? "No results in this state." : "No results yet.";
    const cap = $("results-cap");
    const completed = state.counts.completedEvaluations || 0;
    cap.hidden = shown.length <= 500 && completed <= MAX_ROWS;
    cap.textContent = `Showing the latest ${Math.min(shown.length, 500)} results here; evalctl results ${runId} lists all ${completed}.`;
  }

  function render() {
    renderSummary();
    renderGraders();
    renderResults();
  }

  function onResult(result) {
    const tally = state.graders.get(result.grader) || { passed: 0, failed: 0, errored: 0, scoreSum: 0, scored: 0 };
    if (result.state === "RESULT_STATE_PASSED") tally.passed += 1;
    else if (result.state === "RESULT_STATE_FAILED") tally.failed += 1;
    else if (result.state === "RESULT_STATE_ERROR") tally.errored += 1;
    if (result.state === "RESULT_STATE_PASSED" || result.state === "RESULT_STATE_FAILED") {
      tally.scoreSum += result.score || 0;
      tally.scored += 1;
    }
    state.graders.set(result.grader, tally);
    const output = `${result.itemId}/${result.repetition || 0}`;
    if (!state.outputs.has(output) && result.state !== "RESULT_STATE_SKIPPED") {
      state.outputs.set(output, { latency: result.latencyMs || 0, cost: result.costUsd || 0 });
    }
    state.scoringCost += result.scoringCostUsd || 0;
    state.rows.push(result);
    if (state.rows.length > MAX_ROWS) state.rows.splice(0, state.rows.length - MAX_ROWS);
  }

  function onEvent(kind, data) {
    if (kind === "heartbeat") return;
    if (kind === "error") throw new StreamError(data);
    const seq = Number(data.seq || 0);
    if (seq && seq <= state.lastSeq) return; // already shown (a resumed stream never repeats; be sure anyway)
    state.lastSeq = seq || state.lastSeq;
    if (data.counts) state.counts = data.counts;
    if (kind === "run" && data.run) {
      state.run = data.run;
      if (TERMINAL.has(data.run.status)) state.finished = true;
    } else if (kind === "result" && data.result) {
      onResult(data.result);
    }
    scheduleRender();
  }

  class StreamError extends Error {
    constructor(status) {
      super(status.message || "the watch failed");
      this.code = status.code;
    }
  }

  // One SSE connection: parse `id:`/`event:`/`data:` blocks as they arrive. Resolves when the stream ends.
  async function readStream(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) kind = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trim());
        }
        if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
      }
    }
  }

  // Watch to the terminal event, resuming after the last seq shown whenever the stream drops.
  async function watch() {
    let failures = 0;
    while (!state.finished) {
      const before = state.lastSeq;
      $("live-state").textContent = failures ? "reconnecting…" : "live";
      $("live-state").className = failures ? "live reconnecting" : "live on";
      try {
        const extra = { accept: "text/event-stream" };
        if (state.lastSeq) extra["last-event-id"] = String(state.lastSeq);
        const response = await fetch(`/v1/runs/${encodeURIComponent(runId)}:watch`, { headers: headers(extra), cache: "no-store" });
        if (!response.ok) {
          const body = await response.json().catch(() => null);
          const error = new ApiError(response.status, body);
          if (response.status < 500 && response.status !== 429) throw error;
          throw new StreamError({ code: 14, message: error.message });
        }
        await readStream(response);
      } catch (error) {
        if (error instanceof ApiError) throw error;
        if (error instanceof StreamError && error.code !== 14 && error.code !== 4) throw error; // not UNAVAILABLE/DEADLINE
      }
      if (state.finished) break;
      failures = state.lastSeq > before ? 1 : failures + 1;
      if (failures > MAX_RECONNECTS) throw new Error("the live connection keeps failing; reload to try again");
      await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 250 * 2 ** Math.min(failures - 1, 5))));
    }
    $("live-state").textContent = "";
    $("live-state").className = "live";
    // The terminal event carries the final aggregate; read the run once more for anything set after it.
    state.run = (await api(`/v1/runs/${encodeURIComponent(runId)}`)).run;
    scheduleRender();
  }

  // The "Compare with…" form in #run-actions: this run is the candidate, the run typed (or picked) the baseline.
  $("compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const baseline = $("compare-baseline").value.trim();
    if (baseline) location.assign(compareHref(baseline, runId));
  });

  async function offerBaselines() {
    const page = await api("/v1/runs?page_size=50");
    const others = (page.runs || []).filter((run) => run.id !== runId);
    $("compare-runs").replaceChildren(...others.map((run) => element("option", { value: run.id, label: run.displayName || run.id })));
  }

  $("filters").addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    state.filter = button.dataset.state;
    for (const other of $("filters").querySelectorAll("button")) other.classList.toggle("active", other === button);
    renderResults();
  });

  return () => {
    showContent();
    offerBaselines().catch(() => {}); // only suggestions for the compare form: typing an id works without them
    api(`/v1/runs/${encodeURIComponent(runId)}`)
      .then((body) => {
        state.about = body.run; // status and counts come from the events, replayed from the first, so they agree
        scheduleRender();
        return watch();
      })
      .catch((error) => {
        $("live-state").textContent = "";
        handleError(error);
      });
  };
}

// ---- /ui/compare?baseline=RUN_ID&candidate=RUN_ID ----

function comparePage() {
  const query = new URLSearchParams(location.search);
  const baseline = (query.get("baseline") || "").trim();
  const candidate = (query.get("candidate") || "").trim();
  let refreshTimer = 0;

  for (const [id, runId] of [["baseline-link", baseline], ["candidate-link", candidate], ["crumb-candidate", candidate]]) {
    $(id).textContent = runId;
    $(id).href = runHref(runId);
  }
  document.title = `${candidate} vs ${baseline} · evalsvc`;

  const verdictName = (verdict) => (verdict || "").replace("COMPARISON_VERDICT_", "");
  const points = (fraction) => `${fraction >= 0 ? "+" : ""}${(100 * fraction).toFixed(1)}`; // as evalctl compare
  const pValue = (p) => String(Number((p ?? 1).toPrecision(3)));

  // One grader's comparison (or the overall one). Pass rates are over the counted pairs, from the 2x2 table.
  // Without pairs (verdict NO_PAIRS) the rates, delta and p are "–": nothing was compared, not "no change".
  // A grader whose definition differs between the runs pairs nothing (NO_PAIRS) and is marked so: rerun the
  // baseline with it to compare under it.
  function row(comparison, overall) {
    const c = comparison;
    const baselinePassed = c.bothPassed + c.regressed;
    const candidatePassed = c.bothPassed + c.improved;
    const verdict = verdictName(c.verdict);
    const measured = (text) => (c.pairs ? text : "–");
    const cell = (field, text) => element("td", { class: "num", "data-field": field, text });
    return element(
      "tr",
      overall ? { class: "overall", "data-overall": "" } : { "data-grader": c.grader },
      element(
        "td",
        {},
        overall ? "All graders" : c.grader,
        ...(c.definitionChanged
          ? [" ", element("span", { class: "badge changed", "data-field": "definition_changed", text: "definition changed" })]
          : []),
      ),
      cell("pairs", String(c.pairs)),
      cell("baseline_pass_rate", percent(baselinePassed, c.pairs - baselinePassed)),
      cell("candidate_pass_rate", percent(candidatePassed, c.pairs - candidatePassed)),
      element(
        "td",
        { class: "num" },
        element("span", { "data-field": "pass_rate_delta", text: measured(points(c.passRateDelta)) }),
        " ",
        element("span", { class: "hint", "data-field": "delta_ci", text: measured(`[${points(c.deltaCiLow)}, ${points(c.deltaCiHigh)}]`) }),
      ),
      cell("changed", `+${c.improved} -${c.regressed}`),
      cell("mcnemar_p", measured(pValue(c.mcnemarPValue))),
      cell("unpaired", String(c.unpaired)),
      element("td", { class: `verdict ${verdict.toLowerCase()}`, "data-field": "verdict", text: verdict }),
    );
  }

  // A comparison including a run still executing is partial: it is read again every 5 s until it is not.
  async function load() {
    const path = `/v1/runs/${encodeURIComponent(candidate)}:compare?${new URLSearchParams({ baseline_run_id: baseline })}`;
    const comparison = (await api(path)).comparison;
    const level = String(Number((100 * (1 - comparison.alpha)).toPrecision(6)));
    $("delta-head").textContent = `Delta pp [${level}% CI]`;
    $("alpha").textContent = `alpha ${comparison.alpha}`;
    $("comparison-body").replaceChildren(
      ...(comparison.graders || []).map((grader) => row(grader, false)),
      row(comparison.overall, true),
    );
    $("partial").hidden = !comparison.partial;
    // Evaluations whose item differs between the runs under the same id (int64: a string in JSON): not paired.
    const changedItems = Number(comparison.changedItems || 0);
    $("changed-items").hidden = !changedItems;
    $("changed-items").textContent = `${changedItems} evaluations of different items: not paired`;
    $("live-state").textContent = comparison.partial ? "a run is still executing: refreshing every 5 s" : "";
    clearTimeout(refreshTimer);
    if (comparison.partial) refreshTimer = setTimeout(() => load().catch(handleError), 5000);
  }

  async function nameRuns() {
    for (const [id, runId] of [["baseline-link", baseline], ["candidate-link", candidate]]) {
      const run = (await api(`/v1/runs/${encodeURIComponent(runId)}`)).run;
      $(id).textContent = run.displayName || runId;
    }
  }

  return () => {
    showContent();
    if (!baseline || !candidate) {
      handleError(new Error("open this page as /ui/compare?baseline=RUN_ID&candidate=RUN_ID, or from a run page's Compare with… form"));
      return;
    }
    Promise.all([load(), nameRuns()]).catch(handleError);
  };
}

// ---- start ----

const PAGES = { runs: runsPage, run: runPage, compare: comparePage };

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromFragment();
  const start = PAGES[document.body.dataset.page]();
  setUpKeyControls(start);
  if (apiKey()) start();
  else showKeyForm("");
  // A #key= fragment typed into the address bar of an open page changes only the fragment: no new load.
  window.addEventListener("hashchange", () => {
    if (!new URLSearchParams(location.hash.slice(1)).has("key")) return;
    takeKeyFromFragment();
    location.reload();
  });
});
