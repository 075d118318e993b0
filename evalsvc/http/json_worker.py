"""The process that parses endpoints' large JSON texts (`python -m evalsvc.http.json_worker`), started
by evalsvc.http.json_bodies over the pipes of evalsvc.workers.

Each request is a pickled text; each reply the pickled `(parsed, problem)`: the parsed value, or None
and why the text is refused (not JSON, nested too deeply, more than MAX_VALUES values). What comes back
is bounded by MAX_VALUES, so the server's unpickling of it is bounded too.
"""

from __future__ import annotations

import pickle

from evalsvc.http.json_bodies import parse_bounded
from evalsvc.workers import serve


def _parse(request: bytes) -> bytes:
    try:
        return pickle.dumps((parse_bounded(pickle.loads(request)), None))
    except ValueError as exc:
        return pickle.dumps((None, str(exc)))


def main() -> None:
    """Parse texts until stdin closes."""
    serve(_parse)


if __name__ == "__main__":
    main()
