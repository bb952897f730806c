"""acquire + release of SharedConcurrencyGate for one tenant: best of 5 x 200,000.

Run with the tree to measure first on PYTHONPATH (either lock API):
``PYTHONPATH=<tree>/src .venv/bin/python benchmarks/runs/2026-12-06-tenant-cap/gatebench.py``
"""

import time

from pqcnet.sentry.shared import SharedConcurrencyGate, SharedLimitState

try:
    state = SharedLimitState.create(workers=2)
except TypeError:  # a tree before 2026-12-06 05:00 UTC, whose create() took the lock
    import multiprocessing

    lock = multiprocessing.get_context("spawn").Lock()
    state = SharedLimitState.create(lock, workers=2)  # type: ignore[call-arg]
gate = SharedConcurrencyGate(state, 0, 1024, 0.5)
n = 200_000
best = 1e9
for _ in range(5):
    t = time.perf_counter()
    for _ in range(n):
        gate.acquire("acme")
        gate.release("acme")
    best = min(best, (time.perf_counter() - t) / n * 1e6)
print(f"acquire+release {best:.2f} us")
state.close()
