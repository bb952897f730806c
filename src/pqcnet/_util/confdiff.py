"""Which keys of a re-read config file differ from the running config, as dotted paths.

Both roles hot-reload only their policy part (the sentry's issuers, limits, ACL and
sanitizer; the relayer's authz and quotas); the rest is fixed for the life of the
process. An edit of that static part used to be ignored without a word, so an operator
who raised ``bounds.max_tunnels`` and saw the file reload believed it applied. A reload
now names those keys (a log line and a ``..._config_restart_pending`` gauge), which is
what a ConfigMap-driven rollout needs to know: restart to apply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

#: keys reported at most (a whole new file reports its first few)
MAX_REPORTED = 32
_MISSING = object()


def plain(value: Any) -> Any:
    """``value`` with dataclasses and pydantic models turned into dicts (recursively), so
    :func:`changed_keys` can name the nested key that changed."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ between ``old`` and ``new`` (nested
    mappings compared key by key; anything else as a whole), sorted, at most
    :data:`MAX_REPORTED`."""
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changed_keys(a, b, path)
        elif a != b:
            out.append(path)
    return out[:MAX_REPORTED]
