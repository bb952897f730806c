"""A local Kubernetes control plane for the Helm chart's tests and for trying the chart
by hand: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (a fake
node whose pods report Running/Ready without a kubelet), all built by
``scripts/deploy-tools install`` (the wrapper module tools/k8s) and all on 127.0.0.1.

Everything lives in one directory: a generated CA, the API server's self-signed serving
certificate, the service-account signing key, a static admin token, the components'
logs and pid files, etcd's data and ``kubeconfig``. Why real components rather than a
fake API: ``helm install --dry-run=server`` then runs the API server's own validation
and admission (Pod Security "restricted" included), and ``helm install/upgrade --wait``
watch real Deployment/StatefulSet controllers roll pods out.

    python tools/kcluster.py up DIR [--bin BIN --stages STAGES]   # prints DIR/kubeconfig
    python tools/kcluster.py down DIR

``BIN`` and ``STAGES`` default to ``$PQCNET_K8S_BIN`` and ``$PQCNET_KWOK_STAGES``
(``.services/deploy-env``). The admin token is for this throw-away cluster only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: the fake node kwok manages (pods are scheduled onto it)
NODE_NAME = "kwok-node-0"
#: components in start order; stopped in reverse
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_CIDR = "10.96.0.0/16"  # cluster-internal addresses only; nothing routes to them
ISSUER = "https://kubernetes.default.svc.cluster.local"


class ClusterError(RuntimeError):
    """The control plane did not come up (the message names the component and its log)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_pki(pki: Path) -> None:
    """CA, the API server's serving cert (127.0.0.1, localhost, the in-cluster names),
    the service-account signing key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pqcnet-kcluster-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default",
                                  "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.96.0.1")]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    sa_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "apiserver.crt": cert.public_bytes(serialization.Encoding.PEM),
        "apiserver.key": _pem_key(key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    for name, data in files.items():
        path = pki / name
        path.write_bytes(data)
        path.chmod(0o600)


@dataclass
class Cluster:
    """One control plane in ``root``. :meth:`up` starts it and returns when a Node is
    Ready and the default ServiceAccount exists; :meth:`down` stops every component
    (also from another process: pids are in ``root/run``)."""

    root: Path
    bin: Path
    stages: Path
    #: the components get SIGKILL when the process that started them dies (a test
    #: session killed hard leaves no control plane behind); off for the CLI, whose
    #: process exits right after `up`
    die_with_parent: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    def _tool(self, name: str) -> str:
        path = self.bin / name
        if not os.access(path, os.X_OK):
            raise ClusterError(f"{path} missing: run `scripts/deploy-tools install k8s`")
        return str(path)

    # ---------------------------------------------------------------- configuration

    def _write_config(self) -> None:
        for d in ("run", "logs", "etcd"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        write_pki(self.pki)
        token = secrets.token_urlsafe(32)
        tokens = self.pki / "tokens.csv"
        tokens.write_text(f'{token},pqcnet-admin,pqcnet-admin,"system:masters"\n')
        tokens.chmod(0o600)
        self.ports = {"etcd": free_port(), "etcd-peer": free_port(), "apiserver": free_port()}
        server = f"https://127.0.0.1:{self.ports['apiserver']}"
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kcluster",
            "clusters": [{"name": "kcluster", "cluster": {
                "server": server, "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "pqcnet-admin", "user": {"token": token}}],
            "contexts": [{"name": "kcluster", "context": {
                "cluster": "kcluster", "user": "pqcnet-admin", "namespace": "default"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)
        # kwok's configuration: the node/pod/volume Stages (the StorageClass among the
        # copied files is applied to the cluster instead).
        docs = [d for f in sorted(self.stages.glob("*.yaml"))
                for d in yaml.safe_load_all(f.read_text()) if d]
        (self.root / "kwok.yaml").write_text(
            yaml.safe_dump_all([d for d in docs if d.get("kind") == "Stage"]))
        (self.root / "cluster-objects.yaml").write_text(yaml.safe_dump_all(
            [d for d in docs if d.get("kind") not in ("Stage", "Kustomization")] + [_node()]))

    def _argv(self, name: str) -> list[str]:
        p, pki, kc = self.ports, self.pki, str(self.kubeconfig)
        if name == "etcd":
            peer = f"http://127.0.0.1:{p['etcd-peer']}"
            client = f"http://127.0.0.1:{p['etcd']}"
            return [self._tool("etcd"), "--name", "kcluster", "--data-dir", str(self.root / "etcd"),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"kcluster={peer}", "--unsafe-no-fsync",
                    "--log-level", "warn"]
        if name == "kube-apiserver":
            return [self._tool(name), f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
                    "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                    f"--secure-port={p['apiserver']}",
                    f"--tls-cert-file={pki / 'apiserver.crt'}",
                    f"--tls-private-key-file={pki / 'apiserver.key'}",
                    f"--token-auth-file={pki / 'tokens.csv'}",
                    "--authorization-mode=RBAC",
                    f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--endpoint-reconciler-type=none", "--allow-privileged=false",
                    "--enable-priority-and-fairness=false", "--profiling=false",
                    f"--cert-dir={self.root / 'run'}"]
        if name == "kube-controller-manager":
            return [self._tool(name), f"--kubeconfig={kc}", "--secure-port=0",
                    "--leader-elect=false", "--use-service-account-credentials=false",
                    f"--service-account-private-key-file={pki / 'sa.key'}",
                    f"--root-ca-file={pki / 'ca.crt'}", "--profiling=false",
                    # a starved kwok (2 loaded cores) must not make the fake node
                    # "unreachable": its pods would be marked not ready
                    "--node-monitor-grace-period=5m"]
        if name == "kube-scheduler":
            return [self._tool(name), f"--kubeconfig={kc}", "--secure-port=0",
                    "--leader-elect=false", "--profiling=false"]
        if name == "kwok":
            return [self._tool(name), f"--kubeconfig={kc}",
                    "--config", str(self.root / "kwok.yaml"),
                    "--manage-all-nodes=true", "--node-ip=127.0.0.1",
                    # the node's heartbeat is its Lease, renewed every 10 s: without
                    # it the node lifecycle controller finds the node silent after its
                    # grace period and marks every pod on it not ready for good
                    "--node-lease-duration-seconds=40"]
        raise ValueError(name)

    # --------------------------------------------------------------------- lifecycle

    def _start(self, name: str) -> None:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(self._argv(name), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=self.root,
                                preexec_fn=_die_with_parent if self.die_with_parent else None)
        log.close()
        self.procs[name] = proc
        (self.root / "run" / f"{name}.pid").write_text(str(proc.pid))

    def _alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def _wait(self, name: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self._alive(name):
                raise ClusterError(f"{name} exited; last lines of its log:\n{self.tail(name)}")
            try:
                if check():
                    return
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise ClusterError(f"{name} not ready after {timeout:.0f}s ({last}); log:\n"
                           f"{self.tail(name)}")

    def tail(self, name: str, lines: int = 25) -> str:
        path = self.root / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
            if path.exists() else "(no log)"

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([self._tool("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
                             capture_output=True, text=True, timeout=timeout, input=input)
        if check and out.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out

    def _readyz(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        token = yaml.safe_load(self.kubeconfig.read_text())["users"][0]["user"]["token"]
        try:
            resp = httpx.get(f"https://127.0.0.1:{self.ports['apiserver']}/readyz",
                             headers={"Authorization": f"Bearer {token}"}, verify=ctx,
                             timeout=5)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def _node_ready(self) -> bool:
        out = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        node = json.loads(out.stdout)
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in node.get("status", {}).get("conditions", []))
        return ready and not node["spec"].get("taints")

    def _default_sa(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0

    def up(self, timeout: float = 180) -> None:
        """Start every component and wait until the cluster can run pods."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_config()
        try:
            self._start("etcd")
            self._wait("etcd", lambda: _tcp_open(self.ports["etcd"]), timeout)
            self._start("kube-apiserver")
            self._wait("kube-apiserver", self._readyz, timeout)
            for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
                self._start(name)
            self.kubectl("apply", "-f", str(self.root / "cluster-objects.yaml"))
            self._wait("kwok", self._node_ready, timeout)
            self._wait("kube-controller-manager", self._default_sa, timeout)
        except BaseException:
            self.down()
            raise

    def down(self, grace: float = 5) -> None:
        """Stop the components: SIGTERM to all at once, SIGKILL after ``grace`` s to
        what is left (the state is throw-away, and the API server may sit out its
        shutdown delay)."""
        pids: list[int] = []
        for name in reversed(COMPONENTS):
            pid_file = self.root / "run" / f"{name}.pid"
            proc = self.procs.get(name)
            pid = proc.pid if proc is not None else _read_pid(pid_file)
            # started here: ours for sure, even before its exec; else check its cmdline
            if pid is not None and (proc is not None or _pid_is(pid, self.root)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            pid_file.unlink(missing_ok=True)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_running(p, self.procs) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _running(pid, self.procs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(grace)  # reap
        self.procs.clear()


def _node() -> dict[str, Any]:
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE_NAME,
                         "labels": {"kubernetes.io/hostname": NODE_NAME,
                                    "kubernetes.io/os": "linux",
                                    "kubernetes.io/arch": "amd64", "type": "kwok"},
                         "annotations": {"kwok.x-k8s.io/node": "fake"}},
            "status": {"allocatable": resources, "capacity": resources}}


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent thread exits (Linux
    PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_is(pid: int, root: Path) -> bool:
    """``pid`` is alive and is one of ours (its command line names our directory)."""
    try:
        return str(root) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _running(pid: int, procs: dict[str, subprocess.Popen[bytes]]) -> bool:
    for proc in procs.values():
        if proc.pid == pid:
            return proc.poll() is None  # our child: reaped by poll, not a zombie
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--bin", type=Path, default=os.environ.get("PQCNET_K8S_BIN"))
    ap.add_argument("--stages", type=Path, default=os.environ.get("PQCNET_KWOK_STAGES"))
    args = ap.parse_args(argv)
    root = args.dir.resolve()
    if args.action == "down":
        Cluster(root, Path(), Path()).down()
        return 0
    if args.bin is None or args.stages is None:
        ap.error("--bin/--stages (or PQCNET_K8S_BIN/PQCNET_KWOK_STAGES: "
                 "source .services/deploy-env)")
    try:
        Cluster(root, args.bin, args.stages).up()
    except ClusterError as exc:
        print(f"kcluster: {exc}", file=sys.stderr)
        return 1
    print(root / "kubeconfig")
    return 0


if __name__ == "__main__":
    sys.exit(main())
