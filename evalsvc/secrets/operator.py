"""The operator's secrets, from `EVALSVC_SECRET_<NAME>` variables and `--secrets-file`, each granted to
some tenants.

- `EVALSVC_SECRET_<NAME>=value` is granted to tenant `default` only, unless
  `EVALSVC_SECRET_<NAME>_TENANTS=t1,t2` (or `*`, every tenant) widens it.
- The file is a JSON object `{"NAME": {"value": "...", "tenants": ["t1", "t2"]}}` (`["*"]` for every
  tenant). The older plain-string form `{"NAME": "value"}` is still read, granted to `default` only
  (the narrowest reading of a file written before grants existed), with a warning naming the entry.

Names are case-insensitive (kept upper-case). A malformed grant is a configuration error: the server
does not start, rather than guess who may use a key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalsvc.config import named
from evalsvc.ids import is_tenant_name

log = logging.getLogger(__name__)

ENV_PREFIX = "EVALSVC_SECRET_"
GRANT_SUFFIX = "_TENANTS"
DEFAULT_TENANT = "default"
EVERY_TENANT = "*"


class SecretsConfigError(ValueError):
    """The operator's secrets cannot be read as configured; the message names the variable or entry."""


@dataclass(frozen=True)
class Grant:
    """One operator secret: its value and who may use it."""

    value: str
    tenants: frozenset[str]

    def allows(self, tenant: str) -> bool:
        """Whether `tenant` may use the secret."""
        return EVERY_TENANT in self.tenants or tenant in self.tenants


def _tenants(raw: Iterable[Any], where: str) -> frozenset[str]:
    tenants = frozenset(str(t).strip() for t in raw)
    # Only names an API key can carry, so a mistyped grant is caught at start.
    bad = sorted(t for t in tenants if t != EVERY_TENANT and not is_tenant_name(t))
    if bad or not tenants:
        raise SecretsConfigError(
            f"{where}: tenants must be '*' or tenant names ([a-z0-9][a-z0-9_-]*), got {sorted(tenants) or 'none'}"
        )
    return tenants


class OperatorSecrets:
    """Named secrets of the operator, with their grants."""

    def __init__(self, environ: Mapping[str, str], file: str = "") -> None:
        self._grants: dict[str, Grant] = {}
        variables = {k[len(ENV_PREFIX) :].upper(): v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
        grants = {k[: -len(GRANT_SUFFIX)]: v for k, v in variables.items() if k.endswith(GRANT_SUFFIX)}
        for name in grants:
            if name not in variables:
                raise SecretsConfigError(
                    f"{ENV_PREFIX}{name}{GRANT_SUFFIX} grants a secret {ENV_PREFIX}{name} that is not set"
                )
            del variables[name + GRANT_SUFFIX]
        for name, value in variables.items():
            where = f"{ENV_PREFIX}{name}{GRANT_SUFFIX}"
            granted = _tenants(grants[name].split(","), where) if name in grants else frozenset({DEFAULT_TENANT})
            self._grants[name] = Grant(value, granted)
        if file:
            self._grants.update(_read_file(file))

    def names(self) -> list[str]:
        """Every secret's name (for logs at start; never values)."""
        return sorted(self._grants)

    def granted(self, tenant: str, name: str) -> str | None:
        """The value of secret `name` if it is granted to `tenant`, else None (missing or not granted: the
        same answer)."""
        grant = self._grants.get(name.upper())
        return grant.value if grant is not None and grant.allows(tenant) else None


def _read_file(path: str) -> dict[str, Grant]:
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SecretsConfigError(
            f"{named('secrets_file')} {path}: cannot read it as JSON ({type(exc).__name__})"
        ) from None
    if not isinstance(loaded, dict):
        raise SecretsConfigError(f"{named('secrets_file')} {path}: must be a JSON object of named secrets")
    grants: dict[str, Grant] = {}
    legacy = []
    for name, entry in loaded.items():
        where = f"{named('secrets_file')} {path}: entry {name!r}"
        if isinstance(entry, str):
            legacy.append(name)
            grants[name.upper()] = Grant(entry, frozenset({DEFAULT_TENANT}))
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("value"), str) and set(entry) <= {"value", "tenants"}):
            raise SecretsConfigError(f'{where}: must be {{"value": "...", "tenants": ["t1", ...]}}')
        tenants = entry.get("tenants", [DEFAULT_TENANT])
        if not isinstance(tenants, list):
            raise SecretsConfigError(f"{where}: tenants must be a list")
        grants[name.upper()] = Grant(entry["value"], _tenants(tenants, where))
    if legacy:
        log.warning(
            "--secrets-file entries %s are plain strings: granted to tenant 'default' only; write "
            '{"value": ..., "tenants": [...]} to grant others',
            ", ".join(sorted(legacy)),
        )
    return grants
