"""Regenerate ``src/pqcnet/proto/*_pb2.py`` (+ ``.pyi`` and gRPC stubs) from ``proto/*.proto``.

Run as ``python tools/protogen.py`` (``make proto``). ``--check`` regenerates into a
temporary directory and exits 1 if anything differs from what is checked in; the
test suite uses it to prove generated code is fresh.

The sources live in the repository's ``proto/`` folder; they are compiled as if they
sat at ``pqcnet/proto/<name>.proto`` so the generated modules import each other as
``pqcnet.proto.<name>_pb2`` — never as a bare ``proto`` package, which is the import
name of proto-plus. The protobuf *package* names on the wire (``pqcnet.*``) are set
in the sources and do not depend on this.
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
GENERATED_DIR = ROOT / "src" / "pqcnet" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
#: Where the sources are staged inside the temporary include root.
PACKAGE_PATH = Path("pqcnet") / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Compile every ``proto/*.proto`` into ``out_dir/pqcnet/proto``; returns generated files."""
    sources = sorted(PROTO_DIR.glob("*.proto"))
    if not sources:
        return []
    stage = out_dir / "src"
    (stage / PACKAGE_PATH).mkdir(parents=True)
    for src in sources:
        shutil.copyfile(src, stage / PACKAGE_PATH / src.name)
    gen_root = out_dir / "gen"
    gen_root.mkdir()
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{stage}",
        f"-I{include}",
        f"--python_out={gen_root}",
        f"--pyi_out={gen_root}",
        f"--grpc_python_out={gen_root}",
        *[str(PACKAGE_PATH / s.name) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    gen = gen_root / PACKAGE_PATH
    return sorted(p for p in gen.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        stale = []
        for path in produced:
            target = GENERATED_DIR / path.name
            if check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(target.name)
            else:
                shutil.copyfile(path, target)
        if check:
            existing = {p.name for p in GENERATED_DIR.iterdir()
                        if p.name.endswith(GENERATED_SUFFIXES)}
            stale += sorted(existing - {p.name for p in produced})
            if stale:
                print("stale generated protobuf code: " + ", ".join(stale) + " (run `make proto`)")
                return 1
            print(f"{len(produced)} generated files are fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
