"""Fixtures: one QSTP mesh per module, and a full stack (backends + sentry) per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    EchoServicer,
    HttpBackend,
    Mesh,
    Stack,
    config_dict,
    grpc_backend,
    make_mesh,
    sentry_stack,
    tcp_echo,
    write_config,
)


@pytest.fixture(scope="session")
def mesh() -> Mesh:
    return make_mesh()


@dataclass
class Env:
    mesh: Mesh
    http: HttpBackend
    grpc: EchoServicer
    stack: Stack
    ports: tuple[int, int, int]
    dir: Path

    def rewrite(self, **kw: Any) -> None:
        write_config(self.dir, self.mesh, config_dict(*self.ports, **kw))


@pytest.fixture
def stack_options() -> dict[str, Any]:
    return {}


@pytest.fixture
async def env(mesh: Mesh, tmp_path: Path, stack_options: dict[str, Any]) -> AsyncIterator[Env]:
    delay = stack_options.pop("delay", 0.0)
    with HttpBackend(delay=delay) as http:
        async with grpc_backend() as (servicer, gport), tcp_echo() as tport:
            ports = (http.port, gport, tport)
            path = write_config(tmp_path, mesh, config_dict(*ports, **stack_options))
            async with sentry_stack(mesh, path) as stack:
                yield Env(mesh, http, servicer, stack, ports, tmp_path)
