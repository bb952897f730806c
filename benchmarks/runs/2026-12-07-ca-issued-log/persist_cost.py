"""Per-issuance persist cost of a CA service's state at N issued entries (median of 20).

Run with either tree on PYTHONPATH; prints one JSON line. The entries are recorded
through MeshCA's own path; each timed step signs a CSR as the CA service does, then
makes the state durable as the service does (before: the whole state file; after:
``save_state``, the journal).
"""

import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import ca as ca_mod
from pqcnet.identity.ca import CA_STATE_FILE, MeshCA
from pqcnet.identity.csr import build_csr
from pqcnet.identity.keystore import atomic_write

TD = "example.org"
NEW = hasattr(MeshCA, "save_state")
csr = build_csr(SigningKey.generate(), f"spiffe://{TD}/acme/relayer/x")
out = {}
for n in (1000, 10000, 100000):
    d = Path(tempfile.mkdtemp(dir="/var/tmp"))
    ca = MeshCA.create(TD)
    now = dt.datetime.now(dt.UTC)
    for i in range(n):
        ca._record(ca_mod.IssuedRecord(10**20 + i, f"spiffe://{TD}/acme/relayer/n{i}",
                                       now + dt.timedelta(hours=12)), now)
    ca.save(d, None)
    times = []
    for _ in range(20):
        ca.sign_csr(csr)
        t0 = time.perf_counter()
        if NEW:
            ca.save_state(d)
        else:
            atomic_write(d / CA_STATE_FILE, ca.state_json(), mode=0o600)
        times.append(time.perf_counter() - t0)
    out[n] = round(statistics.median(times) * 1000, 3)
print(json.dumps({"tree": "after" if NEW else "before", "ms_per_issuance_persist": out,
                  "load": os.getloadavg()[0]}))
