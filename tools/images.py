"""Build the pqcnet role images (``pqcnet-sentry``, ``pqcnet-relayer``) from docker/Dockerfile.

    python tools/images.py [--role sentry|relayer]... [--base-image IMG] [--tag TAG] [--services]

1. Wheelhouse on the host (``build/wheelhouse``): ``pip wheel`` of pqcnet and every
   dependency of its ``relayer``, ``sentry`` and ``fast`` (uvloop) extras, so the image
   build installs from files only (``--no-index``) and needs no network or TLS inside
   the build. The dependencies are re-wheeled only when pyproject.toml or the extras
   change; pqcnet's own wheel at every build.
2. ``docker build --target <role>`` with the repository root as context, filtered by
   .dockerignore down to ``build/wheelhouse``; ``BASE_IMAGE_DIGEST`` is the base
   image's id as the daemon reports it, so the attestation measures which base it was.

The daemon is the one in ``$DOCKER_HOST`` (``scripts/deploy-tools start`` writes
``PQCNET_DOCKER_HOST`` / ``PQCNET_BASE_IMAGE`` / ``PQCNET_DOCKER_CLI`` to
``.services/deploy-env``; they are read from there when not in the environment).
Prints one JSON line per image: tag, id, size in bytes, build seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "build" / "wheelhouse"
ROLES = ("sentry", "relayer")
#: each role's extras; ``fast`` (uvloop) because the hot paths were measured on it
EXTRAS = {"sentry": "sentry,fast", "relayer": "relayer,fast"}
DEFAULT_BASE = "debian:bookworm-slim"


def deploy_env() -> dict[str, str]:
    """``.services/deploy-env`` merged under the process environment."""
    env: dict[str, str] = {}
    path = ROOT / ".services" / "deploy-env"
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip().removeprefix("export ")
            if "=" in line and not line.startswith("#"):
                k, _, v = line.partition("=")
                env[k] = v
    env.update({k: v for k, v in os.environ.items() if k.startswith("PQCNET_")})
    return env


def docker_cmd(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The docker CLI and the environment to run it with."""
    proc_env = dict(os.environ)
    if env.get("PQCNET_DOCKER_HOST"):
        proc_env["DOCKER_HOST"] = env["PQCNET_DOCKER_HOST"]
    proc_env["DOCKER_BUILDKIT"] = "1"
    return [env.get("PQCNET_DOCKER_CLI", "docker")], proc_env


def version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    return "0.0.0"


def revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def wheelhouse(python: str = sys.executable) -> Path:
    """Fill :data:`WHEELHOUSE`; returns it."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    stamp = WHEELHOUSE / ".deps-stamp"
    extras = ",".join(sorted({x for e in EXTRAS.values() for x in e.split(",")}))
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()
                            ).hexdigest()
    for old in WHEELHOUSE.glob("pqcnet-*.whl"):
        old.unlink()
    pip = [python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(WHEELHOUSE)]
    if not stamp.exists() or stamp.read_text() != digest:
        subprocess.run([*pip, f"{ROOT}[{extras}]"], check=True)
        stamp.write_text(digest)
    else:
        subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)
    return WHEELHOUSE


#: What a role image is built from / what a service image is built from: an image whose
#: ``pqcnet.inputs`` label differs from the hash of these is stale (built from another
#: tree — a branch, an older commit) and is rebuilt instead of reused.
ROLE_INPUTS = ("src", "pyproject.toml", "docker/Dockerfile", ".dockerignore")
SERVICE_INPUTS = ("docker/services.Dockerfile", "docker/kafka-entrypoint.sh")
INPUTS_LABEL = "pqcnet.inputs"


def inputs_hash(paths: tuple[str, ...], root: Path = ROOT) -> str:
    """SHA-256 (16 hex) over the relative paths and contents of the files under ``paths``
    (uncommitted edits count; caches and bytecode do not)."""
    h = hashlib.sha256()
    for rel in paths:
        top = root / rel
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for f in files:
            if not f.is_file() or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def image_inputs(name: str) -> str:
    """The inputs hash image ``pqcnet-<name>`` must carry to be current (a service image
    also names the Kafka and go-waku builds it copies from the services cache)."""
    if name in ROLES:  # the extras are a build argument: part of what the image is
        return hashlib.sha256(f"{inputs_hash(ROLE_INPUTS)}|{EXTRAS[name]}".encode()
                              ).hexdigest()[:16]
    cache = Path(os.environ.get("PQCNET_CACHE", Path.home() / ".cache" / "pqcnet"))
    builds = sorted(p.name for p in (*cache.glob("kafka-*"), *cache.glob("waku-*"))
                    if (p / "installed").exists())
    return hashlib.sha256((inputs_hash(SERVICE_INPUTS) + "|".join(builds)).encode()
                          ).hexdigest()[:16]


def current(docker: list[str], env: dict[str, str], name: str, tag: str) -> bool:
    """Whether ``pqcnet-<name>:<tag>`` exists and was built from this tree's inputs."""
    out = subprocess.run([*docker, "image", "inspect", "--format",
                          f'{{{{index .Config.Labels "{INPUTS_LABEL}"}}}}',
                          f"pqcnet-{name}:{tag}"], capture_output=True, text=True, env=env)
    return out.returncode == 0 and out.stdout.strip() == image_inputs(name)


def image_id(docker: list[str], env: dict[str, str], ref: str) -> str:
    out = subprocess.run([*docker, "image", "inspect", "--format", "{{.Id}}", ref],
                         check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip()


def build(role: str, *, base: str, tag: str, env: dict[str, str]) -> dict[str, object]:
    docker, proc_env = docker_cmd(env)
    base_digest = image_id(docker, proc_env, base)
    ref = f"pqcnet-{role}:{tag}"
    t0 = time.monotonic()
    subprocess.run(
        [*docker, "build", "--quiet", "-f", str(ROOT / "docker" / "Dockerfile"),
         "--target", role, "-t", ref, "--label", f"{INPUTS_LABEL}={image_inputs(role)}",
         "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"BASE_IMAGE_DIGEST={base_digest}",
         "--build-arg", f"EXTRAS={EXTRAS[role]}", "--build-arg", f"VERSION={version()}",
         "--build-arg", f"REVISION={revision()}", str(ROOT)],
        check=True, env=proc_env, stdout=subprocess.DEVNULL)
    seconds = round(time.monotonic() - t0, 1)
    out = subprocess.run([*docker, "image", "inspect", "--format", "{{.Id}} {{.Size}}", ref],
                         check=True, capture_output=True, text=True, env=proc_env)
    iid, size = out.stdout.split()
    return {"image": ref, "id": iid, "size": int(size), "build_seconds": seconds,
            "base": base, "base_digest": base_digest}


SERVICES = ("kafka", "waku", "redis", "prometheus")
SERVICES_CONTEXT = ROOT / "build" / "services-context"


def _cached(pattern: str) -> Path:
    """The newest cache entry scripts/services made for ``pattern`` (kafka-*, waku-*)."""
    cache = Path(os.environ.get("PQCNET_CACHE", Path.home() / ".cache" / "pqcnet"))
    found = sorted((p for p in cache.glob(pattern) if (p / "installed").exists()),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {pattern} in {cache}: run scripts/services install")
    return found[-1]


def stage_services() -> Path:
    """build/services-context: the Kafka jars and go-waku binary from the services cache."""
    import shutil

    ctx = SERVICES_CONTEXT
    if ctx.exists():
        shutil.rmtree(ctx)
    ctx.mkdir(parents=True)
    shutil.copytree(_cached("kafka-*") / "libs", ctx / "kafka-libs")
    shutil.copy2(_cached("waku-*") / "waku", ctx / "waku")
    shutil.copy2(ROOT / "docker" / "kafka-entrypoint.sh", ctx / "kafka-entrypoint.sh")
    return ctx


def build_service(name: str, *, base: str, tag: str, env: dict[str, str]) -> dict[str, object]:
    docker, proc_env = docker_cmd(env)
    ref = f"pqcnet-{name}:{tag}"
    t0 = time.monotonic()
    subprocess.run(
        [*docker, "build", "--quiet", "-f", str(ROOT / "docker" / "services.Dockerfile"),
         "--target", name, "-t", ref, "--build-arg", f"BASE_IMAGE={base}",
         "--label", f"{INPUTS_LABEL}={image_inputs(name)}",
         str(SERVICES_CONTEXT)], check=True, env=proc_env, stdout=subprocess.DEVNULL)
    seconds = round(time.monotonic() - t0, 1)
    out = subprocess.run([*docker, "image", "inspect", "--format", "{{.Id}} {{.Size}}", ref],
                         check=True, capture_output=True, text=True, env=proc_env)
    iid, size = out.stdout.split()
    return {"image": ref, "id": iid, "size": int(size), "build_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", action="append", choices=ROLES)
    ap.add_argument("--base-image", default=None)
    ap.add_argument("--tag", default=version())
    ap.add_argument("--skip-wheels", action="store_true", help="Reuse build/wheelhouse as is.")
    ap.add_argument("--skip-roles", action="store_true", help="Build no role image.")
    ap.add_argument("--services", action="store_true",
                    help="Also build the compose network's Kafka, go-waku, Redis, Prometheus.")
    args = ap.parse_args(argv)
    env = deploy_env()
    base = args.base_image or env.get("PQCNET_BASE_IMAGE") or DEFAULT_BASE
    roles = [] if args.skip_roles else (args.role or list(ROLES))
    if roles and not args.skip_wheels:
        wheelhouse()
    for role in roles:
        print(json.dumps(build(role, base=base, tag=args.tag, env=env)), flush=True)
    if args.services:
        stage_services()
        for name in SERVICES:
            print(json.dumps(build_service(name, base=base, tag=args.tag, env=env)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
