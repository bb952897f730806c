#!/bin/sh
# Relayer hot path with nothing parked: base bfb6c56 (before parking) vs the working
# tree, alternated. Run from the repository root with base checked out at /tmp/base
# (git worktree add -f /tmp/base bfb6c56).
out=benchmarks/runs/2026-12-05-parking-ab
for i in 1 2 3 4; do
  for side in base new; do
    if [ "$side" = base ]; then pp=/tmp/base/src:/tmp/base; else pp=; fi
    PYTHONPATH=$pp .venv/bin/python -c "import json; from pqcnet.bench.relayer import run; print(json.dumps(run(backend='embedded', frames=120000, paced_frames=600, baselines=False)))" > $out/$side-$i.json 2>/dev/null
  done
done
