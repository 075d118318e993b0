"""Text a tenant or a target wrote (outputs, explanations, error reasons, names, labels), made safe for where
evalctl writes it, by spelling out the characters that do not belong there in Python's escape form: ESC becomes
the four characters `\\x1b`, U+FFFF `\\uffff`, a lone surrogate `\\ud800`. A visible form rather than U+FFFD or
nothing: `\\x1b[31m` still says the agent coloured its output, which is often the bug being looked for.
(A backslash the text itself holds is left as it is: `\\x1b` in the output reads the same as an escaped ESC.)"""

from __future__ import annotations

import re

# What XML 1.0 forbids (its Char production allows #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] |
# [#x10000-#x10FFFF]): one of these in a JUnit file, and Jenkins or GitLab rejected the whole report.
XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

# What a terminal acts on rather than shows: C0 controls but tab and newline (ESC starts colours, cursor moves,
# OSC 8 links and OSC 52 clipboard writes; CR and backspace overwrite what was printed), DEL and C1 controls
# (U+009B is a one-character CSI). A target's output rewrote or recoloured CI log lines through evalctl's tables.
TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def for_xml(text: str) -> str:
    """`text` with every character XML 1.0 forbids spelled out (`\\x1b`, `\\uffff`); the rest as it is."""
    return XML_FORBIDDEN.sub(_escaped, text)


def for_terminal(text: str) -> str:
    """`text` with every control character a terminal would act on spelled out (`\\x1b`, `\\x0d`, `\\x9b`), tab and
    newline kept: what evalctl prints of text a tenant or a target wrote."""
    return TERMINAL_CONTROLS.sub(_escaped, text)
