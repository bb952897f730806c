#!/bin/bash
# A/B: relayer kafka bench, base (HEAD, PYTHONPATH first) vs working tree; alternated
cd /work/main; source .services/env
for pair in 1 2 3; do
 for side in base new; do
  if [ $side = base ]; then PP=/tmp/base/src:/tmp/base; else PP=/work/main/src:/work/main; fi
  PYTHONPATH=$PP timeout 300 .venv/bin/python -c "
import json,os
from pqcnet.bench.relayer import run
import pqcnet.relayer.bus.kafka as k
r=run(backend='kafka', frames=60000, paced_frames=600, baselines=False)
print(json.dumps({'side':'$side','pair':$pair,'load':os.getloadavg()[0],'fmw':getattr(k,'FETCH_MAX_WAIT_MS',None),'r':r}))
" 2>/dev/null >> /tmp/kx/ab.jsonl
 done
done
