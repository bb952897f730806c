"""The one bounded YAML reader every config loader uses: typed, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.errors import PqcnetError


class _Bad(PqcnetError):
    pass


def test_reads_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("shards: 32\nname: r1\n")
    assert read_yaml_file(f, _Bad) == {"shards": 32, "name": "r1"}


@pytest.mark.parametrize(("body", "needle"), [
    (None, "cannot read config"),
    ("a: [1, 2\n", "is not valid YAML"),
    ("x" * 2048, "is larger than 1024 bytes"),
])
def test_problems_raise_the_callers_error(tmp_path: Path, body: str | None, needle: str) -> None:
    f = tmp_path / "c.yaml"
    if body is not None:
        f.write_text(body)
    with pytest.raises(_Bad, match=needle) as info:
        read_yaml_file(f, _Bad, max_bytes=1024)
    assert "\n" not in str(info.value)
