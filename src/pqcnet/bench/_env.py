"""Where a benchmark finds the real services: the environment, else ``.services/env``.

``scripts/services start`` writes ``.services/env`` in the checkout; a benchmark run
from that checkout (``pqcnet bench relayer --backend redis``) finds the services
without the user sourcing the file. The file is looked up from the current directory
upwards, since an installed package has no idea where the checkout is.
"""

from __future__ import annotations

import os
from pathlib import Path


def services_env(name: str) -> str:
    """The value of ``name`` from the environment, else from the nearest ``.services/env``."""
    value = os.environ.get(name, "")
    if value:
        return value
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        env = folder / ".services" / "env"
        if env.is_file():
            for line in env.read_text().splitlines():
                line = line.removeprefix("export ").strip()
                if line.startswith(f"{name}="):
                    return line.split("=", 1)[1].strip().strip('"').strip("'")
            break
    return ""
