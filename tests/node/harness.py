"""Run ``pqcnet node run`` as a real subprocess and talk to it like an operator would.

:class:`NodeProcess` starts the console script, waits (bounded) for its ``ready`` JSON
line, and on exit sends SIGTERM and checks the clean shutdown (exit 0). Governance
directives go through the real ``pqcnet mesh directive`` command.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from tests.config.schemacheck import assert_schema
from tests.procs import PQCNET

#: bytes of the node's stderr kept (the newest); older output is dropped
STDERR_KEEP = 4 << 20


def namespace() -> str:
    """A content-topic namespace of its own per test (runs share the go-waku nodes)."""
    return "n" + uuid.uuid4().hex[:10]


def write_yaml(path: Path, data: dict[str, Any], *, kind: str = "node",
               valid: bool = True) -> Path:
    """Write a config file; the JSON Schema of ``kind`` must accept it (or refuse it,
    for a file written invalid on purpose)."""
    assert_schema(kind, data, valid=valid)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def until_async(cond: Callable[[], Awaitable[bool]], limit_s: float, what: str,
                      interval: float = 0.1) -> None:
    """Poll an async condition until true; fail naming ``what`` after ``limit_s``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not await cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


class NodeProcess:
    """``pqcnet node run --config FILE`` in a subprocess."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.stderr = b""
        self._err = bytearray()
        self._drain: asyncio.Task[None] | None = None

    async def _drain_stderr(self) -> None:
        """Read stderr as it comes: a pipe nobody reads fills (64 KiB) and then blocks the
        node in its next log write — its whole event loop, gRPC included."""
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self._err += chunk
            del self._err[:-STDERR_KEEP]

    def stderr_so_far(self) -> bytes:
        """What the node wrote on stderr until now (the newest ``STDERR_KEEP`` bytes)."""
        return bytes(self._err)

    async def __aenter__(self) -> NodeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = await asyncio.create_subprocess_exec(
            PQCNET, "--log-level", "info", "--log-json", "node", "run",
            "--config", str(self.config), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        assert self.proc.stdout is not None
        self._drain = asyncio.create_task(self._drain_stderr())
        try:
            async with asyncio.timeout(30):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            await self._kill()
            raise AssertionError("node did not become ready in 30 s") from None
        if not line:
            await self.proc.wait()
            await self._drain
            raise AssertionError(f"node exited {self.proc.returncode}: "
                                 f"{self._err.decode()[-2000:]}")
        self.ready = json.loads(line)
        assert self.ready["ready"] is True
        return self

    async def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._collect()

    async def _collect(self) -> None:
        if self._drain is not None:
            try:
                async with asyncio.timeout(5):
                    await self._drain
            except TimeoutError:
                self._drain.cancel()
        self.stderr = bytes(self._err)

    async def stop(self) -> int:
        """SIGTERM, bounded wait; returns the exit status (killed: -9)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await self.proc.wait()
            except TimeoutError:
                await self._kill()
        await self._collect()
        return self.proc.returncode if self.proc.returncode is not None else -9

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run_cli(*args: str, limit_s: float = 30.0) -> tuple[int, str, str]:
    """Run ``pqcnet ARGS``; returns (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        PQCNET, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(limit_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"pqcnet {' '.join(args)} did not finish in {limit_s} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
