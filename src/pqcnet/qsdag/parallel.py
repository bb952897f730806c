"""Signature checks spread across cores for bulk import and audit.

Why: an ML-DSA-65 verify is the largest single cost of anchoring a vertex, and a
peer's batch (:meth:`Ledger.import_ <pqcnet.qsdag.ledger.Ledger.import_>`) or a
whole-ledger audit (:meth:`Ledger.verify <pqcnet.qsdag.ledger.Ledger.verify>`) has
hundreds of them queued up. Anchoring itself must stay sequential (the rules read
the state the previous vertex left), but the signatures need not.

Why the ledger's decisions cannot change: the workers compute only the pure fact
"key K's signature S over message M is valid", ahead of the anchoring, for the key
each vertex will most likely need (anchored, or registered earlier in the same
stream). Valid facts go into a bounded memo that
:func:`~pqcnet.qsdag.rules.verify_signature` consults. The rules still decide, in
their order, *which* key must have signed *which* bytes; a memo hit only skips
recomputing a verify whose answer is known, and a miss or a failed check is
verified again, for real, in order. So parallel and serial runs anchor the same
vertices in the same order and reject the same ones with the same errors.

Threads or processes: ``cryptography``'s ML-DSA verify releases the GIL (its Rust
binding detaches around OpenSSL; ``tests/qsdag/test_parallel.py`` checks that,
without timing), so threads that only verify do run side by side. But the
anchoring thread runs Python almost all the time, and a verifier thread needs the
GIL back after every verify: it then waits for the interpreter's switch interval
(5 ms), which caps a verifier thread at a few hundred verifies per second while
anchoring runs (measured; benchmarks/README.md). Worker *processes* have no such
convoy; they cost a pickled copy of each signature and message. ``mode`` selects;
``"process"`` is the default.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import multiprocessing
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Literal, TypeVar

from pqcnet.crypto.errors import CryptoError, SignatureInvalid
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.errors import PqcnetError
from pqcnet.qsdag.errors import InvalidPayload, MalformedVertex
from pqcnet.qsdag.payloads import Genesis, KeyRecord, decode_payload
from pqcnet.qsdag.vertex import DOMAIN, Vertex, VertexKind, decode

__all__ = [
    "MAX_WORKERS", "ParallelVerifier", "VerifierConfigError", "prepare_import", "proven",
]

log = logging.getLogger("pqcnet.qsdag")

#: Most worker threads/processes one verifier may run: each holds a core busy.
MAX_WORKERS = 32
#: Vertices per worker task: amortises the hand-off (and, for processes, the pickling).
CHUNK = 256
#: How far (vertices) the verifier reads ahead of the anchoring. Bounds the vertices
#: held in memory and the work wasted if the consumer stops early.
LOOKAHEAD = 2048
#: Valid signatures remembered at most; the oldest is forgotten first. Forgetting
#: only costs a repeat verify (an orphan released long after it was checked).
MAX_PROVEN = 16_384
#: Keys remembered from key records seen in the stream (registrations not yet anchored).
MAX_STREAM_KEYS = 4096
#: Worker-side cache of parsed public keys (processes receive raw key bytes).
MAX_WORKER_KEYS = 1024

T = TypeVar("T")
U = TypeVar("U")
#: (algorithm, raw public key, signature, message): one verified fact
Fact = tuple[str, bytes, bytes, bytes]
KeyLookup = Callable[[str, int], VerifyKey | None]


class VerifierConfigError(PqcnetError, ValueError):
    """A :class:`ParallelVerifier` was configured with an impossible setting."""


class _Proven:
    """The bounded memo of valid signatures the rules consult."""

    __slots__ = ("_facts",)

    def __init__(self) -> None:
        self._facts: OrderedDict[Fact, None] = OrderedDict()

    def add(self, fact: Fact) -> None:
        self._facts[fact] = None
        if len(self._facts) > MAX_PROVEN:
            self._facts.popitem(last=False)

    def __contains__(self, fact: Fact) -> bool:
        return fact in self._facts


_PROVEN: contextvars.ContextVar[_Proven | None] = contextvars.ContextVar(
    "pqcnet_qsdag_proven", default=None)


def proven(key: VerifyKey, v: Vertex) -> bool:
    """Did a worker of the active verification session find ``v``'s signature valid
    under ``key``? (False outside a session: the caller verifies.)"""
    memo = _PROVEN.get()
    return memo is not None and (key.algorithm, key.raw, v.signature, v.canonical()) in memo


# --------------------------------------------------------------------------- workers

_WORKER_KEYS: OrderedDict[tuple[str, bytes], VerifyKey] = OrderedDict()


def _resolve(key: VerifyKey | tuple[str, bytes]) -> VerifyKey:
    if isinstance(key, VerifyKey):
        return key
    hit = _WORKER_KEYS.get(key)
    if hit is None:
        hit = _WORKER_KEYS[key] = VerifyKey.from_raw(*key)
        if len(_WORKER_KEYS) > MAX_WORKER_KEYS:
            _WORKER_KEYS.popitem(last=False)
    return hit


def _check_chunk(keys: list[VerifyKey] | list[tuple[str, bytes]],
                 jobs: list[tuple[int, bytes, bytes]]) -> list[bool]:
    """Worker task: for each (key index, signature, message), is it valid?"""
    resolved = [_resolve(k) for k in keys]
    out = []
    for index, signature, message in jobs:
        try:
            resolved[index].verify(signature, message, context=DOMAIN)
            out.append(True)
        except SignatureInvalid:
            out.append(False)
    return out


# --------------------------------------------------------------------------- the verifier


class _Chunk:
    """Checks gathered for one worker task, and its future once submitted."""

    __slots__ = ("facts", "future", "jobs", "keys", "merged")

    def __init__(self) -> None:
        self.keys: dict[tuple[str, bytes], tuple[int, VerifyKey]] = {}
        self.jobs: list[tuple[int, bytes, bytes]] = []
        self.facts: list[Fact] = []
        self.future: Future[list[bool]] | None = None
        self.merged = False

    def add(self, key: VerifyKey, v: Vertex) -> None:
        ident = (key.algorithm, key.raw)
        index = self.keys.setdefault(ident, (len(self.keys), key))[0]
        message = v.canonical()
        self.jobs.append((index, v.signature, message))
        self.facts.append((key.algorithm, key.raw, v.signature, message))


class ParallelVerifier:
    """A bounded pool that checks vertex signatures ahead of sequential anchoring.

    One verifier may serve several ledgers, one stream at a time per thread. The
    owner closes it (:meth:`close`); a ledger only borrows it.
    """

    def __init__(self, workers: int, *, mode: Literal["process", "thread"] = "process",
                 chunk: int = CHUNK, lookahead: int = LOOKAHEAD) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise VerifierConfigError(f"verifier workers must be 1..{MAX_WORKERS}, got {workers}")
        if mode not in ("process", "thread"):
            raise VerifierConfigError(f"verifier mode must be 'process' or 'thread', not {mode!r}")
        if not 1 <= chunk <= lookahead:
            raise VerifierConfigError(f"need 1 <= chunk <= lookahead, got {chunk}, {lookahead}")
        self.workers = workers
        self.mode = mode
        #: vertices per worker task (:data:`CHUNK`)
        self.chunk = chunk
        #: vertices read ahead of the anchoring at most (:data:`LOOKAHEAD`)
        self.lookahead = lookahead
        self._pool: Executor | None = None
        self._broken = False

    def _executor(self) -> Executor | None:
        if self._broken:
            return None
        if self._pool is None:
            if self.mode == "thread":
                self._pool = ThreadPoolExecutor(self.workers,
                                                thread_name_prefix="qsdag-verify")
            else:
                # spawn, not fork: the owner may run threads (asyncio, gRPC) that a
                # forked child would inherit in an unknown state.
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def warm_up(self) -> None:
        """Start the workers now rather than during the first batch (a spawned
        process imports pqcnet first, ~1 s)."""
        pool = self._executor()
        if pool is not None:
            futures = [pool.submit(_check_chunk, [], []) for _ in range(self.workers)]
            for f in futures:
                f.result()

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ParallelVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def ahead(self, items: Iterable[T], prepare: Callable[[T], tuple[U, Vertex | None]],
              key_for: KeyLookup) -> Iterator[Iterator[U]]:
        """The prepared ``items`` in their order, each yielded only once its
        signature check (if any) has finished; the rules see the results through
        :func:`proven` while the ``with`` block runs.

        ``prepare`` turns an item into (what to yield, the vertex to check or None);
        ``key_for(node, version)`` is the key the consumer's state already knows.
        """
        memo = _Proven()
        token = _PROVEN.set(memo)
        chunks: list[_Chunk] = []
        try:
            yield self._stream(items, prepare, key_for, memo, chunks)
        finally:
            _PROVEN.reset(token)
            for chunk in chunks:
                if chunk.future is not None:
                    chunk.future.cancel()

    def _stream(self, items: Iterable[T], prepare: Callable[[T], tuple[U, Vertex | None]],
                key_for: KeyLookup, memo: _Proven, chunks: list[_Chunk]) -> Iterator[U]:
        stream_keys: OrderedDict[tuple[str, int], VerifyKey] = OrderedDict()
        buffered: deque[tuple[U, _Chunk | None]] = deque()
        open_chunk = _Chunk()
        source = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(buffered) < self.lookahead:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                out, v = prepare(item)
                target: _Chunk | None = None
                if v is not None:
                    _learn_keys(v, stream_keys)
                    for key in _candidates(v, key_for, stream_keys):
                        open_chunk.add(key, v)
                        target = open_chunk
                buffered.append((out, target))
                if len(open_chunk.jobs) >= self.chunk:
                    self._submit(open_chunk, chunks)
                    open_chunk = _Chunk()
            if not buffered:
                return
            out, chunk = buffered.popleft()
            if chunk is not None:
                if chunk.future is None:
                    self._submit(open_chunk, chunks)
                    open_chunk = _Chunk()
                self._merge(chunk, memo, chunks)
            yield out

    def _submit(self, chunk: _Chunk, chunks: list[_Chunk]) -> None:
        if not chunk.jobs:
            return
        pool = self._executor()
        # threads share the key objects; processes get raw bytes (parsed once there)
        keys: list[VerifyKey] | list[tuple[str, bytes]] = (
            [k for _, k in chunk.keys.values()] if self.mode == "thread" else list(chunk.keys))
        if pool is not None:
            try:
                chunk.future = pool.submit(_check_chunk, keys, chunk.jobs)
            except RuntimeError as exc:  # shut down, or a broken process pool
                self._give_up(exc)
        if chunk.future is None:
            done: Future[list[bool]] = Future()
            done.set_result([False] * len(chunk.jobs))  # nothing proven: rules verify
            chunk.future = done
        chunks.append(chunk)

    def _merge(self, chunk: _Chunk, memo: _Proven, chunks: list[_Chunk]) -> None:
        if chunk.merged:
            return
        chunk.merged = True
        assert chunk.future is not None
        try:
            results = chunk.future.result()
        except Exception as exc:  # a dead worker proves nothing; the rules verify
            self._give_up(exc)
            results = []
        for fact, ok in zip(chunk.facts, results):
            if ok:
                memo.add(fact)
        chunks.remove(chunk)

    def _give_up(self, exc: BaseException) -> None:
        if not self._broken:
            log.warning("parallel signature checks disabled, verifying serially",
                        extra={"error": f"{type(exc).__name__}: {exc}"})
        self._broken = True


def prepare_import(item: Vertex | bytes) -> tuple[Vertex | bytes, Vertex | None]:
    """For :meth:`ParallelVerifier.ahead` over an import stream: decode bytes once;
    an item that does not decode or encode passes through unchecked (the import
    reports it in its place)."""
    try:
        v = decode(item) if isinstance(item, bytes) else item
        v.canonical()
    except MalformedVertex:
        return item, None
    return v, v


def _learn_keys(v: Vertex, stream_keys: OrderedDict[tuple[str, int], VerifyKey]) -> None:
    """Remember keys a genesis or KEY_VERSION vertex registers (not anchored yet)."""
    if v.kind not in (VertexKind.GENESIS, VertexKind.KEY_VERSION):
        return
    try:
        payload = decode_payload(v.kind, v.payload)
    except InvalidPayload:
        return
    records = payload.authorities if isinstance(payload, Genesis) else (payload,)
    for rec in records:
        if not isinstance(rec, KeyRecord):
            continue
        try:
            stream_keys[(rec.node_id, rec.key_version)] = VerifyKey.from_raw(
                rec.algorithm, rec.public_key)
        except CryptoError:
            continue
        if len(stream_keys) > MAX_STREAM_KEYS:
            stream_keys.popitem(last=False)


def _candidates(v: Vertex, key_for: KeyLookup,
                stream_keys: OrderedDict[tuple[str, int], VerifyKey]) -> list[VerifyKey]:
    """The keys ``v`` will most likely be checked against (at most two)."""
    out = []
    try:
        known = key_for(v.author, v.key_version)
    except PqcnetError:  # e.g. a damaged key row: the rules will report it in order
        known = None
    if known is not None:
        out.append(known)
    streamed = stream_keys.get((v.author, v.key_version))
    if streamed is not None and streamed != known:
        out.append(streamed)
    return out
