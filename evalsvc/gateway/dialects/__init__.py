"""The vendor dialects of the REST gateway, one module (or package) each (see `base.Dialect`).

Discovery is by module: adding `evalsvc/gateway/dialects/<vendor>.py` (or a package `<vendor>/`) with a
`DIALECT` adds a dialect, and nothing else changes. `--dialects` chooses which are mounted and where.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from evalsvc.gateway.dialects.base import Dialect

_NOT_DIALECTS = {"base", "uuids"}  # shared parts, not vendors
# A mount point: a URL path of one or more segments, such as /omni or /vendors/omni.
_PREFIX = re.compile(r"(/[A-Za-z0-9._~!$&'()*+;=:@%-]+)+")


def available() -> dict[str, Dialect]:
    """Every dialect module in this package, by name."""
    found: dict[str, Dialect] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name in _NOT_DIALECTS or module.name.startswith("_"):
            continue
        dialect: Dialect = importlib.import_module(f"{__name__}.{module.name}").DIALECT
        found[dialect.name] = dialect
    return found


def mounts(spec: str) -> list[tuple[Dialect, str]]:
    """The dialects to mount and their prefixes, from `--dialects`: "all", "none", or a comma-separated
    list of `name` (at its documented prefix) or `name=/prefix`. Unknown names, prefixes that are no
    URL path (`omni=x` was an AssertionError traceback from FastAPI once the database had been migrated),
    and a name given twice raise ValueError."""
    known = available()
    if spec.strip() in ("", "none"):
        return []
    if spec.strip() == "all":
        return [(d, d.prefix) for _, d in sorted(known.items())]
    chosen = []
    named: dict[str, str] = {}  # name -> how it was given
    for part in spec.split(","):
        name, _, prefix = part.strip().partition("=")
        if name not in known:
            raise ValueError(f"unknown dialect {name!r}; known: {', '.join(sorted(known))}")
        if name in named:  # `omni=/x,omni=/y` mounted Omni at both prefixes without a word
            raise ValueError(f"{name} is named twice ({named[name]!r} and {part.strip()!r}); name each dialect once")
        named[name] = part.strip()
        if prefix and not (prefix == "/" or _PREFIX.fullmatch(prefix.rstrip("/"))):  # "/": the root
            raise ValueError(
                f"the prefix of {name} must be a URL path starting with '/' (such as /{name}), not {prefix!r}"
            )
        chosen.append((known[name], prefix.rstrip("/") if prefix else known[name].prefix))
    return chosen
