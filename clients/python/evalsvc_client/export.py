"""Result exports: JSON Lines (one Result in proto JSON per line, every field: `to_dict`) and JUnit XML (one
testsuite per grader). JSON escapes every control character itself (`\\u001b`); XML 1.0 cannot hold some at all,
so the JUnit file spells those out (`visible.for_xml`)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any, TextIO

from google.protobuf import json_format

from evalsvc_client import pb
from evalsvc_client.visible import for_xml


def to_dict(message: Any) -> dict[str, Any]:
    """A message as proto JSON with the .proto field names (snake_case, where REST's JSON has lowerCamelCase) and
    enum names; every field without presence is there, at its default too (`"score": 0.0`, `"passed": false`,
    `"errored": 0`, `[]`): a FAILED result without `score` or `passed` broke `jq .score` and `r["passed"]` on
    exactly the results that matter. A message field, or a scalar marked optional, that is unset stays out."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


# What a shown output or explanation ends with when the service listed it cut short to fit one response
# (Result.output_truncated, Result.explanation_truncated): shown bare, a cut one read as the whole of it.
CUT_MARK = " [... cut short in this listing; the stored one is whole]"


def listed_output(result: pb.Result) -> str:
    """The result's output content as listed, marked when the service cut it short."""
    return result.output.content + (CUT_MARK if result.output_truncated else "")


def listed_explanation(result: pb.Result) -> str:
    """The result's explanation as listed, marked when the service cut it short."""
    return result.explanation + (CUT_MARK if result.explanation_truncated else "")


def write_jsonl(results: Iterable[pb.Result], out: TextIO) -> int:
    count = 0
    for result in results:
        out.write(json.dumps(to_dict(result), sort_keys=True) + "\n")
        count += 1
    return count


def junit_xml(run: pb.Run, results: Iterable[pb.Result]) -> ET.ElementTree:
    """JUnit XML: a testsuite per grader, a testcase per item and repetition; FAILED -> <failure>,
    ERROR -> <error>, SKIPPED -> <skipped>. Times are the target's latency. Characters XML 1.0 forbids (ANSI
    colours' ESC, form feeds, U+FFFF...) are spelled out in every text and attribute (`\\x1b`): written raw, one
    coloured output made the file not well-formed, and CI rejected the whole report."""
    suites: dict[str, ET.Element] = {}
    counts: dict[str, dict[str, float]] = {}
    name = run.display_name or run.id
    root = ET.Element("testsuites", name=name)
    for result in results:
        suite = suites.get(result.grader)
        if suite is None:
            suite = suites[result.grader] = ET.SubElement(root, "testsuite", name=f"{name}.{result.grader}")
            counts[result.grader] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
        tally = counts[result.grader]
        seconds = result.latency_ms / 1000.0
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{name}.{result.grader}",
            name=f"{result.item_id}#{result.repetition}",
            time=f"{seconds:.3f}",
        )
        tally["tests"] += 1
        tally["time"] += seconds
        if result.state == pb.run.RESULT_STATE_FAILED:
            tally["failures"] += 1
            explanation = listed_explanation(result)
            ET.SubElement(
                case, "failure", message=explanation, type="FAILED"
            ).text = f"score {result.score:.3f}: {explanation}\noutput: {listed_output(result)}"
        elif result.state == pb.run.RESULT_STATE_ERROR:
            tally["errors"] += 1
            ET.SubElement(case, "error", message=result.error_reason or listed_explanation(result), type="ERROR")
        elif result.state == pb.run.RESULT_STATE_SKIPPED:
            tally["skipped"] += 1
            ET.SubElement(case, "skipped")
    totals = {"tests": 0.0, "failures": 0.0, "errors": 0.0, "skipped": 0.0, "time": 0.0}
    for grader, suite in suites.items():
        for key, value in counts[grader].items():
            suite.set(key, f"{value:.3f}" if key == "time" else str(int(value)))
            totals[key] += value
    for key, value in totals.items():
        root.set(key, f"{value:.3f}" if key == "time" else str(int(value)))
    for element in root.iter():
        if element.text:
            element.text = for_xml(element.text)
        for attribute, text in element.attrib.items():
            element.set(attribute, for_xml(text))
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(run: pb.Run, results: Iterable[pb.Result], path: str) -> None:
    junit_xml(run, results).write(path, encoding="utf-8", xml_declaration=True)
