"""acquire + release of SharedConcurrencyGate for one tenant: best of 5 x 200,000.

Run with the tree to measure first on PYTHONPATH:
``PYTHONPATH=<tree>/src .venv/bin/python benchmarks/runs/2026-12-06-tenant-cap/gatebench.py``
"""

import multiprocessing
import time

from pqcnet.sentry.shared import SharedConcurrencyGate, SharedLimitState

lock = multiprocessing.get_context("spawn").Lock()
state = SharedLimitState.create(lock, workers=2)
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
