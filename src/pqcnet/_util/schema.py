"""The typed config schema's shared parts: a strict base model, a few constrained
types, and the one function that turns a validation failure into one line.

Every config file pqcnet reads (sentry, relayer, node) is described by pydantic v2
models built on :class:`Schema`; the models validate the YAML mapping *and* emit the
JSON Schema that deployment tooling (Helm's ``values.schema.json``) is generated from,
so the two cannot drift. See ``docs/decisions/0002-config-schema.md`` for why pydantic.

:func:`validate` is the only way a role loader runs a model: any failure becomes the
role's own typed error (a :class:`~pqcnet.errors.PqcnetError` subclass) with a message
of the form ``<file>: <key.path[0].sub>: <what is wrong>`` — one line naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_PORT = r"([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_HOST = r"[^\s:/,][^\s/,]*"
#: host:port (host non-empty, no spaces or commas; port 0..65535).
HOSTPORT_PATTERN = rf"^{_HOST}:{_PORT}$"
#: a comma-separated list of host:port (Kafka bootstrap servers); empty allowed.
HOSTPORTS_PATTERN = rf"^({_HOST}:{_PORT}(,{_HOST}:{_PORT})*)?$"
#: an http:// or https:// URL.
HTTP_URL_PATTERN = r"^https?://\S+$"
#: hex bytes (an even number of hex digits).
HEX_PATTERN = r"^([0-9a-fA-F]{2})*$"

#: what each pattern means, for error messages ("expected host:port, got 'x'")
_PATTERN_NAMES = {HOSTPORT_PATTERN: "host:port", HOSTPORTS_PATTERN: "host:port[,host:port...]",
                  HTTP_URL_PATTERN: "an http(s):// URL", HEX_PATTERN: "hex bytes"}
#: "key: problem" — how a rule between keys (a model validator) words its message
_NAMED_RULE = re.compile(r"^([a-z_][a-z0-9_/]*): ")
#: longest repr of a bad value quoted in an error (a pasted blob must not flood the log)
MAX_QUOTED = 80

HostPort = Annotated[str, Field(pattern=HOSTPORT_PATTERN)]
HostPorts = Annotated[str, Field(pattern=HOSTPORTS_PATTERN)]
HttpUrl = Annotated[str, Field(pattern=HTTP_URL_PATTERN)]
HexBytes = Annotated[str, Field(pattern=HEX_PATTERN)]
Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]

M = TypeVar("M", bound=BaseModel)


class Schema(BaseModel):
    """Base of every config model: unknown keys refused, no silent type coercion
    (``"5"`` is not an int, ``true`` is not a number; an int is accepted as a float),
    immutable, and field docstrings become JSON Schema descriptions."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              use_attribute_docstrings=True)


def split_hostport(value: str, *, default_host: str = "") -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; ``ValueError`` naming the value otherwise.

    The one parser of addresses given in configs and on command lines. An empty host
    (``":7400"``) is allowed only when ``default_host`` supplies one.
    """
    host, sep, port = value.rpartition(":")
    host = host or default_host
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return host, int(port)


def key_path(loc: Sequence[int | str]) -> str:
    """``("backends", 0, "target")`` -> ``backends[0].target``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _child(node: Any, part: int | str) -> tuple[bool, Any]:
    if isinstance(node, Mapping) and part in node:
        return True, node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return True, node[part]
    return False, None


def _real_loc(loc: Sequence[int | str], data: Any, missing: bool) -> list[int | str]:
    """The part of a pydantic location that names keys of ``data``.

    Locations inside a union carry the branch's name (``'str'``, ``'RelayerConfig'``);
    those are not keys a user wrote, so they are dropped by walking the input. Only a
    ``missing`` error's last element is a key the input does not have.
    """
    out: list[int | str] = []
    cur = data
    for i, part in enumerate(loc):
        found, child = _child(cur, part)
        if found:
            cur = child
        elif i < len(loc) - 1 or not missing:
            continue  # a union branch tag
        out.append(part)
    return out


def _describe(err: Mapping[str, Any]) -> str:
    kind, msg, ctx = err["type"], str(err["msg"]), err.get("ctx") or {}
    got = repr(err.get("input"))
    if len(got) > MAX_QUOTED:
        got = got[: MAX_QUOTED - 3] + "..."
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "value_error":
        return str(ctx.get("error", msg))
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in _PATTERN_NAMES:
        return f"expected {_PATTERN_NAMES[ctx['pattern']]}, got {got}"
    msg = re.sub(r"a valid dictionary( or instance of \w+)?", "a mapping", msg)
    msg = msg.replace("Input should be ", "must be ").replace("a valid list", "a list")
    msg = re.sub(r"^(List|Dictionary|String|Tuple) should have", "must have", msg)
    return f"{msg}, got {got}"


def format_error(exc: ValidationError, data: Any, source: str = "") -> str:
    """One line for the most specific problem in ``exc`` (see the module docstring)."""
    errors = exc.errors()
    located = [(_real_loc(e["loc"], data, e["type"] == "missing"), e) for e in errors]
    loc, err = max(located, key=lambda le: len(le[0]))  # deepest: the branch that matched
    text = _describe(err)
    named = _NAMED_RULE.match(text) if err["type"] == "value_error" else None
    if named:  # a rule between keys names its key first: put it in the path
        loc, text = [*loc, named.group(1)], text[named.end():]
    parts = [p for p in (source, key_path(loc)) if p]
    return ": ".join([*parts, text])


def validate(model: type[M], data: Any, error: Callable[[str], Exception], *,
             source: str = "") -> M:
    """``model`` validated from ``data``; any failure raises ``error(one_line)``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_error(exc, data, source)) from None


def where(source: str, *keys: int | str) -> str:
    """Prefix of a message about ``keys`` of ``source`` (checks done after the schema)."""
    return ": ".join(p for p in (source, key_path(keys)) if p)


__all__ = [
    "HEX_PATTERN", "HOSTPORTS_PATTERN", "HOSTPORT_PATTERN", "HTTP_URL_PATTERN", "MAX_QUOTED",
    "Count", "HexBytes", "HostPort", "HostPorts", "HttpUrl", "Port", "Positive", "Schema",
    "format_error", "key_path", "split_hostport", "validate", "where",
]
