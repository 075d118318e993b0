"""What a violation says about a oneof none of whose fields is set.

A oneof's name (`kind`) is no field: no proto path or JSON path reaches it (AIP-193), so the violation
names the enclosing field (`target`, `graders[2]`) and lists the choices. Leaf code, imported by the
grading processes too (`evalsvc.graders.builtin`), so nothing here loads more than protobuf.
"""

from __future__ import annotations

from google.protobuf.message import Message


def one_of(message: Message, oneof: str) -> str:
    """The description of a violation for `message`'s unset `oneof`: its fields, by proto name."""
    choices = ", ".join(field.name for field in message.DESCRIPTOR.oneofs_by_name[oneof].fields)
    return f"set exactly one of {choices}"
