"""Rewrite the README's configuration table from evalsvc.config (tests/test_server.py checks it)."""

from __future__ import annotations

from pathlib import Path

from evalsvc import config

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{flag}` | `{env}` | `{default}` | {text} |" for flag, env, default, text in config.describe()]
    text = README.read_text()
    start = text.index("| flag | environment variable")
    end = text.index("\n\n", start)
    README.write_text(text[:start] + "\n".join(rows) + text[end:])


if __name__ == "__main__":
    main()
