"""Regenerate ``proto/*_pb2.py`` (+ ``.pyi`` and gRPC stubs) from ``proto/*.proto``.

Run as ``python -m proto.build`` (``make proto``). ``--check`` regenerates into a
temporary directory and exits 1 if anything differs from what is checked in; the
test suite uses it to prove generated code is fresh.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile every ``proto/*.proto`` into ``out_dir/proto``; returns generated files."""
    sources = sorted(PROTO_DIR.glob("*.proto"))
    if not sources:
        return []
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s.relative_to(ROOT)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    gen = out_dir / "proto"
    return sorted(p for p in gen.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        stale = []
        for path in produced:
            target = PROTO_DIR / path.name
            if check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(target.name)
            else:
                shutil.copyfile(path, target)
        if check:
            existing = {p.name for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
            stale += sorted(existing - {p.name for p in produced})
            if stale:
                print("stale generated protobuf code: " + ", ".join(stale) + " (run `make proto`)")
                return 1
            print(f"{len(produced)} generated files are fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
