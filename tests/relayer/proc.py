"""Run ``pqcnet relayer run`` as a real subprocess (for SIGKILL and CLI tests)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import yaml

from tests.config.schemacheck import assert_schema
from tests.procs import PQCNET
from tests.relayer.e2e import GRANT_ALL, identities


def write_config(tmp: Path, **kw: Any) -> Path:
    ident = tmp / "ident"
    if not ident.exists():
        identities()[0].save(ident, None)
    cfg = {"node_id": "relayer-p", "listen_port": 0, "identity_dir": str(ident),
           "data_dir": str(tmp / "data"), "shards": 8, "authz": GRANT_ALL, **kw}
    path = tmp / "relayer.yaml"
    assert_schema("relayer", {"relayer": cfg})
    path.write_text(yaml.safe_dump({"relayer": cfg}))
    return path


class RelayerProcess:
    """A relayer subprocess; ``port`` etc. from its ``ready`` line."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}

    async def start(self, limit: float = 60.0) -> RelayerProcess:
        log = self.config.parent / "relayer.log"
        with log.open("ab") as err:  # a file, not a pipe nobody drains
            self.proc = await asyncio.create_subprocess_exec(
                PQCNET, "relayer", "run", "--config", str(self.config),
                stdout=asyncio.subprocess.PIPE, stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        async with asyncio.timeout(limit):
            line = await self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"relayer did not start: {log.read_text()[-2000:]}")
        self.ready = json.loads(line)
        return self

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            if self.proc is not None:
                await self.proc.wait()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
