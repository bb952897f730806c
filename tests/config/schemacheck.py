"""Check a config mapping against the emitted JSON Schema with an independent validator
(the ``jsonschema`` package, not pydantic).

The suites' config writers (``tests/sentry/harness.write_config``,
``tests/relayer/proc.write_config``, ``tests/node/harness.write_yaml``) call
:func:`assert_schema` on every file they write, so each config the test-suite uses is
checked against the schema deployment tooling gets — and a file a test writes on
purpose as invalid must be refused by it too (where JSON Schema can state the rule).
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema

from pqcnet.runtime.schema import json_schema


@functools.cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json_schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(kind: str, doc: Any) -> list[str]:
    """What the JSON Schema of ``kind`` finds wrong with ``doc`` (empty: accepted)."""
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator(kind).iter_errors(doc)]


def assert_schema(kind: str, doc: Any, *, valid: bool = True) -> None:
    """``doc`` is accepted (``valid``) or refused by the JSON Schema of ``kind``."""
    errors = schema_errors(kind, doc)
    if valid:
        assert not errors, f"JSON Schema refuses a {kind} config the suite uses: {errors}"
    else:
        assert errors, f"JSON Schema accepts a {kind} config the suite writes as invalid"
