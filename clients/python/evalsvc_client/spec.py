"""Run specs for `evalctl run`: a YAML (or JSON) file naming a dataset file, a target and graders.

    display_name: nightly qa
    dataset: qa.jsonl            # .jsonl, .csv, .yaml/.yml or .json, relative to the spec; or dataset_id: ds_...
    target: provided             # or echo, or a Target in proto JSON: {provided: {}, model_id: gpt-x}
    graders:
      - {name: exact, exact_match: {normalize_whitespace: true}}
      - {name: mentions, contains: {values: [Paris]}}
    pass_threshold: 90           # percent; unset means every evaluation must pass
    repetitions: 1
    labels: {suite: qa}

Dataset rows are Items in proto JSON (`id`, `input`, `expected_output`, `context`, `expected_tool_calls`,
`response`, `metadata`); `response` may be a plain string (the recorded output). In CSV, columns `id`, `input`,
`expected_output`, `context` and `response` fill those fields, `expected_tool_calls` is split on `;`, and any
other column becomes metadata.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from evalsvc_client import pb
from evalsvc_client._common import create_run_request, to_grader, to_target

_ITEM_FIELDS = {"id", "input", "expected_output", "context", "response"}


class SpecError(ValueError):
    """A spec or dataset file that cannot be used; the message says where and why."""


def _load_structured(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a dependency of evalsvc-client
        raise SpecError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from exc
    return yaml.safe_load(text)


def item_from_row(row: Mapping[str, Any], where: str) -> pb.Item:
    """An Item from one dataset row (proto JSON, with `response` allowed as a plain string)."""
    data = dict(row)
    for key in ("id", "input", "expected_output", "context"):
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            data[key] = str(value)  # YAML reads `expected_output: 4` as a number
    if isinstance(data.get("response"), str):
        data["response"] = {"content": data["response"]}
    try:
        return json_format.ParseDict(data, pb.Item())
    except json_format.ParseError as exc:
        raise SpecError(f"{where}: {exc}") from exc


def _csv_row(row: Mapping[str, str], where: str) -> pb.Item:
    data: dict[str, Any] = {k: v for k, v in row.items() if k in _ITEM_FIELDS and v not in (None, "")}
    if row.get("expected_tool_calls"):
        data["expected_tool_calls"] = [t.strip() for t in row["expected_tool_calls"].split(";") if t.strip()]
    metadata = {k: v for k, v in row.items() if k not in _ITEM_FIELDS | {"expected_tool_calls"} and k and v}
    if metadata:
        data["metadata"] = metadata
    return item_from_row(data, where)


def load_items(path: Path) -> list[pb.Item]:
    """Items from a .jsonl, .csv, .yaml/.yml or .json dataset file."""
    if not path.is_file():
        raise SpecError(f"{path}: no such dataset file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SpecError(f"{path}:{number}: {exc}") from exc
                items.append(item_from_row(row, f"{path}:{number}"))
        return items
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return [_csv_row(row, f"{path}:{n}") for n, row in enumerate(csv.DictReader(handle), start=2)]
    if suffix in (".yaml", ".yml", ".json"):
        data = _load_structured(path)
        rows = data.get("items") if isinstance(data, Mapping) else data
        if not isinstance(rows, list):
            raise SpecError(f"{path}: expected a list of items (or a mapping with `items`)")
        return [item_from_row(row, f"{path}: item {n}") for n, row in enumerate(rows)]
    raise SpecError(f"{path}: unknown dataset format {suffix!r} (use .jsonl, .csv, .yaml or .json)")


@dataclass
class RunSpec:
    """A parsed spec: everything CreateRun needs."""

    target: pb.Target
    graders: list[pb.Grader]
    items: list[pb.Item] = field(default_factory=list)
    dataset_id: str = ""
    item_ids: list[str] = field(default_factory=list)
    display_name: str = ""
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    pass_threshold: float | None = None
    repetitions: int = 0
    warmup_runs: int = 0
    request_id: str | None = None
    cache_mode: int = 0  # pb.cache.CacheMode; 0: the server's default

    def request(self) -> pb.runs.CreateRunRequest:
        request = create_run_request(
            target=self.target,
            graders=self.graders,
            items=self.items,
            dataset_id=self.dataset_id,
            item_ids=self.item_ids,
            display_name=self.display_name,
            description=self.description,
            labels=self.labels,
            pass_threshold=self.pass_threshold,
            repetitions=self.repetitions,
            warmup_runs=self.warmup_runs,
            trigger=pb.run.TRIGGER_AUTO,
            request_id=self.request_id,
        )
        request.cache_mode = self.cache_mode  # type: ignore[assignment]
        return request


CACHE_MODES = {name.removeprefix("CACHE_MODE_").lower(): value for name, value in pb.cache.CacheMode.items() if value}


def cache_mode(name: str) -> int:
    """The CacheMode of `off`, `read_write`, `refresh` or `replay` (docs/targets.md)."""
    try:
        return CACHE_MODES[name.strip().lower()]
    except KeyError:
        raise SpecError(f"cache_mode must be one of {', '.join(CACHE_MODES)}, not {name!r}") from None


_SPEC_KEYS = {
    "dataset",
    "items",
    "dataset_id",
    "item_ids",
    "target",
    "graders",
    "display_name",
    "description",
    "labels",
    "pass_threshold",
    "repetitions",
    "warmup_runs",
    "request_id",
    "cache_mode",
}


def load_spec(path: Path) -> RunSpec:
    """Parse a run spec file; dataset paths are relative to the spec's directory."""
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    data = _load_structured(path)
    if not isinstance(data, Mapping):
        raise SpecError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise SpecError(f"{path}: unknown keys {', '.join(unknown)}")
    if "target" not in data or not data.get("graders"):
        raise SpecError(f"{path}: `target` and at least one grader are required")
    try:
        target = to_target(data["target"])
        graders = [to_grader(g) for g in data["graders"]]
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise SpecError(f"{path}: {exc}") from exc
    items: list[pb.Item] = []
    if "dataset" in data:
        items = load_items((path.parent / str(data["dataset"])).resolve())
    elif "items" in data:
        items = [item_from_row(row, f"{path}: items[{n}]") for n, row in enumerate(data["items"])]
    threshold = data.get("pass_threshold")
    return RunSpec(
        target=target,
        graders=graders,
        items=items,
        dataset_id=str(data.get("dataset_id", "")),
        item_ids=[str(i) for i in data.get("item_ids", [])],
        display_name=str(data.get("display_name", "")),
        description=str(data.get("description", "")),
        labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
        pass_threshold=float(threshold) if threshold is not None else None,
        repetitions=int(data.get("repetitions", 0)),
        warmup_runs=int(data.get("warmup_runs", 0)),
        request_id=data.get("request_id"),
        cache_mode=cache_mode(str(data["cache_mode"])) if "cache_mode" in data else 0,
    )
