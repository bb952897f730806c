"""Bounded YAML config-file reading, shared by every role's config loader.

Sentries, relayers and the node runtime all validate their config at start; this
is the one place that reads such a file with a size bound and turns OS and YAML
errors into the caller's own typed error with a one-line message. What the mapping
must hold is the schema's business (:mod:`pqcnet._util.schema`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

#: Largest config file read (bounds memory spent on a mistaken or hostile path).
MAX_CONFIG_BYTES = 1024 * 1024


def read_yaml_file(path: Path, error: Callable[[str], Exception], *, what: str = "config",
                   max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Parse ``path`` as YAML; any problem raises ``error(message)``."""
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {path} is larger than {max_bytes} bytes")
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise error(f"{what} {path} is not valid YAML: {first}") from None
