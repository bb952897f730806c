"""A small durable set of ids: "this was done already", kept across restarts.

The slashing pipeline must make each proposal and each slash once, also when the node
restarts between two runs; the facts it acts on (ledger evidence) are still there
after a restart, so without a memory it would act again. :class:`IdJournal` is that
memory: an append-only file of hex ids, one per line, fsynced per append (an id is
recorded *after* the action it stands for, so a crash in between repeats the action
once, never loses it; a line torn by a crash is cut when the journal opens). It is
bounded: past ``max_ids`` the oldest ids are forgotten at
the next compaction (an atomic rewrite), which only risks repeating an action whose
evidence is older than ``max_ids`` newer ones.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from pqcnet._util.files import cut_torn_tail
from pqcnet.identity.keystore import atomic_write
from pqcnet.mesh.errors import ConfigError

#: Ids kept by default (each line is ~35 bytes).
DEFAULT_MAX_IDS = 100_000


class IdJournal:
    """A bounded set of byte ids, persisted at ``path`` (in memory only when None)."""

    def __init__(self, path: Path | None, *, max_ids: int = DEFAULT_MAX_IDS) -> None:
        if max_ids < 1:
            raise ConfigError("a journal must keep at least one id")
        self.path = path
        self.max_ids = max_ids
        self._ids: OrderedDict[bytes, None] = OrderedDict()
        self._lines = 0
        if path is not None and path.exists():
            cut_torn_tail(path)  # a fragment's action is repeated once, never lost
            for line in path.read_text(encoding="ascii", errors="replace").split():
                try:
                    self._remember(bytes.fromhex(line))
                except ValueError:
                    continue
                self._lines += 1

    def __contains__(self, item: bytes) -> bool:
        return item in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def _remember(self, item: bytes) -> None:
        self._ids[item] = None
        self._ids.move_to_end(item)
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)

    def add(self, item: bytes) -> None:
        """Record ``item`` durably (no-op if known)."""
        if item in self._ids:
            return
        self._remember(item)
        if self.path is None:
            return
        if self._lines >= 2 * self.max_ids:
            atomic_write(self.path, "".join(i.hex() + "\n" for i in self._ids).encode())
            self._lines = len(self._ids)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="ascii") as fh:
            fh.write(item.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._lines += 1
