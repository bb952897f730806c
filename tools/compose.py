"""Bring the compose network (compose.yaml) up and down on our dockerd.

    python tools/compose.py up [--project P] [--tag T] [--build]   # make compose-up
    python tools/compose.py down [--project P]                       # make compose-down

``up``: identities into the project's own secrets directory (compose/make-secrets,
today's CLI; ``build/compose/<project>/secrets`` unless ``--secrets DIR``), images if
missing (tools/images.py --services), ``docker-compose up -d``, then waits (bounded)
until every container with a healthcheck is healthy. ``down`` removes the containers,
the network, the volumes and that secrets directory (the CA service wrote its state
there; the next ``up`` issues fresh identities for fresh ledgers). One directory per
project: two checkouts or test runs never share identities or CA state. Debian's
docker-compose v1 (ADR 0018); the daemon and CLI come from .services/deploy-env.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import images

ROOT = images.ROOT
SERVICE_IMAGES = ("sentry", "relayer", *images.SERVICES)


#: what docker-compose keeps of a project name as is (it would rewrite others, and the
#: name is a path component of the secrets directory)
PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def secrets_dir(project: str) -> Path:
    """The default secrets directory of a project (compose.yaml's default for ``pqcnet``)."""
    if not PROJECT_NAME.fullmatch(project):
        raise SystemExit(f"compose project name {project!r}: use lowercase letters, digits, "
                         "'-' and '_' (starting with a letter or digit)")
    return ROOT / "build" / "compose" / project / "secrets"


class Compose:
    """docker-compose (v1) for one project on our daemon, with its own secrets directory
    (``secrets``: default :func:`secrets_dir`; ``down`` removes it)."""

    def __init__(self, project: str = "pqcnet", tag: str | None = None,
                 secrets: Path | None = None) -> None:
        self.project = project
        self.tag = tag or images.version()
        default = secrets_dir(project)  # also checks the project name
        self.secrets_dir = (secrets or default).resolve()
        env = images.deploy_env()
        self.docker_cli = env.get("PQCNET_DOCKER_CLI", "docker")
        self.compose_cli = env.get("PQCNET_COMPOSE", "docker-compose")
        self.env = dict(os.environ, PQCNET_IMAGE_TAG=self.tag,
                        PQCNET_COMPOSE_SECRETS=str(self.secrets_dir))
        if env.get("PQCNET_DOCKER_HOST"):
            self.env["DOCKER_HOST"] = env["PQCNET_DOCKER_HOST"]
        self.deploy_env = env

    def compose(self, *args: str, check: bool = True,
                timeout: float = 600) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([self.compose_cli, "-f", str(ROOT / "compose.yaml"),
                              "-p", self.project, *args], env=self.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)}: exit {res.returncode}\n"
                               f"{res.stderr[-3000:]}")
        return res

    def docker(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.docker_cli, *args], env=self.env, capture_output=True,
                              text=True, check=check, timeout=timeout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def port(self, service: str, port: int) -> int:
        out = self.compose("port", service, str(port)).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    def missing_images(self) -> list[str]:
        """Images of the network that are absent or were built from other inputs (another
        branch, an older tree: :func:`images.current`)."""
        docker, env = images.docker_cmd(self.deploy_env)
        return [n for n in SERVICE_IMAGES if not images.current(docker, env, n, self.tag)]

    def secrets(self) -> None:
        pqcnet = str(Path(sys.executable).with_name("pqcnet"))
        subprocess.run([str(ROOT / "compose" / "make-secrets"), str(self.secrets_dir)],
                       env=dict(os.environ, PQCNET=pqcnet), check=True, timeout=300)

    def health(self) -> dict[str, str]:
        """service container name -> health (or state when it has no healthcheck)."""
        ids = self.compose("ps", "-q").stdout.split()
        if not ids:
            return {}
        out = self.docker("inspect", *ids).stdout
        states = {}
        for c in json.loads(out):
            st = c["State"]
            states[c["Name"].lstrip("/")] = st.get("Health", {}).get("Status") or st["Status"]
        return states

    def wait_healthy(self, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.health()
            if states and all(s in ("healthy", "running") for s in states.values()):
                return states
            time.sleep(2)
        raise TimeoutError(f"compose network not healthy after {timeout:.0f}s: {states}")

    def up(self, *, build: bool = False, timeout: float = 600) -> dict[str, str]:
        self.secrets()
        stale = list(SERVICE_IMAGES) if build else self.missing_images()
        if stale:
            roles = [a for r in images.ROLES if r in stale for a in ("--role", r)]
            services = ["--services"] if set(stale) - set(images.ROLES) else []
            subprocess.run([sys.executable, str(ROOT / "tools" / "images.py"),
                            *(roles or ["--skip-roles"]), *services, "--tag", self.tag],
                           check=True, timeout=3600)
        self.compose("up", "-d", timeout=timeout)
        return self.wait_healthy(timeout)

    def logs(self, service: str = "") -> str:
        res = self.compose("logs", "--no-color", "--tail", "60", *([service] if service else []),
                           check=False)
        return res.stdout + res.stderr

    def down(self, *, keep_secrets: bool = False) -> None:
        """Remove the network's containers, network and volumes. ``docker-compose down``
        can fail and leave every container running (seen once after the full compose
        test, cause not captured): what it reports is printed, and whatever is still
        labelled with this project is removed with ``docker`` directly."""
        res = self.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)
        if res.returncode != 0:
            print(f"docker-compose down -p {self.project}: exit {res.returncode}\n"
                  f"{res.stderr[-3000:]}", file=sys.stderr)
        label = f"label=com.docker.compose.project={self.project}"
        left = self.docker("ps", "-aq", "--filter", label, check=False).stdout.split()
        if left:
            print(f"docker-compose down left {len(left)} containers of {self.project}; "
                  "removing them", file=sys.stderr)
            self.docker("rm", "-f", "-v", *left, check=False)
        for kind in ("network", "volume"):
            names = self.docker(kind, "ls", "-q", "--filter", label,
                                check=False).stdout.split()
            if names:
                self.docker(kind, "rm", *names, check=False)
        if not keep_secrets:
            shutil.rmtree(self.secrets_dir, ignore_errors=True)
            if self.secrets_dir.parent == secrets_dir(self.project).parent:
                with contextlib.suppress(OSError):  # build/compose/<project>, if empty
                    self.secrets_dir.parent.rmdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--project", default="pqcnet")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--build", action="store_true", help="Rebuild the images first.")
    ap.add_argument("--secrets", type=Path, default=None,
                    help="Secrets directory (default: build/compose/<project>/secrets).")
    ap.add_argument("--keep-secrets", action="store_true",
                    help="down: keep the secrets directory.")
    args = ap.parse_args(argv)
    c = Compose(args.project, args.tag, args.secrets)
    if args.command == "up":
        states = c.up(build=args.build)
        print(json.dumps(states, indent=1))
        print(f"prometheus: http://127.0.0.1:{c.port('prometheus', 9090)}  relayers: "
              f"127.0.0.1:{c.port('relayer-1', 7400)} 127.0.0.1:{c.port('relayer-2', 7400)}"
              "  client: docker-compose exec client python3 ... (sidecar at 127.0.0.1:8080)")
        print(f"export COMPOSE_FILE=compose.yaml COMPOSE_PROJECT_NAME={c.project} "
              f"PQCNET_COMPOSE_SECRETS={c.secrets_dir}")
    elif args.command == "down":
        c.down(keep_secrets=args.keep_secrets)
    else:
        print(json.dumps(c.health(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
