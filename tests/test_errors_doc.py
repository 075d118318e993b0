"""docs/errors.md against `evalsvc.errors.Reason` (no server): every reason the table documents is a
member, and every member is documented. A reason added to the code, or to the doc, fails here until
the other side has it too."""

from __future__ import annotations

import re
from pathlib import Path

from evalsvc.errors import Reason

DOC = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text(encoding="utf-8")
HEADER = ["condition", "code", "reason"]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def documented_reasons() -> set[str]:
    """The backticked names in the `reason` column of the table of RPC errors (rows such as
    "(none: grpc's own status)" name none)."""
    lines = DOC.splitlines()
    start = next(i for i, line in enumerate(lines) if cells(line)[:3] == HEADER)
    column = HEADER.index("reason")
    found: set[str] = set()
    for line in lines[start + 2 :]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        found.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", cells(line)[column]))
    return found


def test_the_table_is_found_and_read() -> None:
    # Guards the parser: an unreadable table must not pass as "nothing documented, nothing defined".
    assert {"INVALID_ARGUMENT", "RUN_NOT_FOUND", "DATABASE_UNAVAILABLE"} <= documented_reasons()


def test_every_documented_reason_is_a_member() -> None:
    missing = documented_reasons() - {reason.value for reason in Reason}
    assert not missing, f"docs/errors.md documents reasons evalsvc.errors.Reason lacks: {sorted(missing)}"


def test_every_member_is_documented() -> None:
    undocumented = {reason.value for reason in Reason} - documented_reasons()
    assert not undocumented, f"Reason members docs/errors.md does not document: {sorted(undocumented)}"


def test_members_are_their_own_names() -> None:
    # What goes on the wire is the value; a member whose name and value differ would read wrong in code.
    assert all(reason.name == reason.value for reason in Reason)
