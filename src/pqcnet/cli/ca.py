"""``pqcnet ca``: run a mesh CA from a directory (init, issue, sign-csr, revoke, crl, bundle).

The CA directory holds ``ca-key.pem`` (PKCS#8, encrypted under the CA passphrase),
``ca-cert.pem`` (the trust bundle), ``ca-state.json`` (policy, revocations, CRL
number) and ``ca-issued.jsonl`` (the issued log, appended per certificate).
Passphrases come from an environment variable (default ``PQCNET_CA_PASSPHRASE``) or an
interactive prompt, never from argv where ``ps`` would show them; ``--no-passphrase``
stores keys unencrypted (development only).

The CA key can live in any key store: ``ca init --key-store FILE`` (a ``key_store:``
mapping: file, pkcs11, shamir) stores it there and records the mapping (no secrets)
as ``key-store.yaml`` in the CA directory, which later commands use by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import yaml

from pqcnet._util.env import CA_PASS_ENV, PASS_ENV
from pqcnet.cli._common import load_identity, passphrase
from pqcnet.cli._keystore import key_store_option, open_store
from pqcnet.identity import IssuancePolicy, MeshCA, NodeIdentity, SpiffeId, load_crl
from pqcnet.identity.ca import CA_CERT_FILE, CA_KEY_FILE, stored_policy
from pqcnet.identity.certs import load_certs
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.keyconfig import KeyStoreConfig, key_store_config, read_key_store_file
from pqcnet.identity.keystore import KeyStore, atomic_write, read_bounded
from pqcnet.identity.spiffe import SpiffeLayout

#: The CA's key-store mapping, recorded by ``ca init --key-store``.
CA_KEY_STORE_FILE = "key-store.yaml"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """``90s`` / ``30m`` / ``12h`` / ``7d`` -> timedelta (clear error otherwise)."""
    match = _DURATION.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 12h or 7d")
    return dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


class Duration(click.ParamType):  # type: ignore[type-arg]
    """A click type for :func:`parse_duration`."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        return parse_duration(str(value))


DURATION = Duration()


class Layout(click.ParamType):  # type: ignore[type-arg]
    """``TEMPLATE[,role=R][,tenant=T]``: a SPIFFE layout (``spiffe_layouts`` in the
    sentry and relayer configs), e.g. ``spiffe://corp.example/ns/{tenant}/sa/{node},role=sidecar``."""

    name = "spiffe-layout"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> SpiffeLayout:
        if isinstance(value, SpiffeLayout):
            return value
        template, *extra = str(value).split(",")
        fixed: dict[str, str] = {}
        for item in extra:
            key, sep, val = item.partition("=")
            if not sep or key.strip() not in ("role", "tenant"):
                self.fail(f"{value!r}: expected TEMPLATE[,role=R][,tenant=T]", param, ctx)
            fixed[key.strip()] = val.strip()
        try:
            return SpiffeLayout.of(template.strip(), **fixed)
        except IdentityError as exc:
            self.fail(str(exc), param, ctx)


LAYOUT = Layout()


def _ca_options(f: Callable[..., None], *, dir_required: bool = True) -> Callable[..., None]:
    f = key_store_option(
        "CA key store config (YAML key_store: mapping: file | pkcs11 | shamir); "
        f"default: --dir/{CA_KEY_STORE_FILE} if present, else --dir/{CA_KEY_FILE}.")(f)
    f = click.option("--no-passphrase", is_flag=True,
                     help="CA key is (or will be) stored unencrypted (development only).")(f)
    f = click.option("--passphrase-env", default=CA_PASS_ENV, show_default=True,
                     help="Environment variable holding the CA key passphrase.")(f)
    f = click.option("--dir", "ca_dir", required=dir_required,
                     type=click.Path(file_okay=False, path_type=Path),
                     help="CA directory.")(f)
    return f


def _key_store_config(ca_dir: Path, key_store_file: Path | None) -> KeyStoreConfig:
    recorded = ca_dir / CA_KEY_STORE_FILE
    path = key_store_file or (recorded if recorded.exists() else None)
    if path is None:
        return key_store_config(None, default_dir=ca_dir, default_key_file=CA_KEY_FILE)
    return read_key_store_file(path, default_dir=ca_dir, default_key_file=CA_KEY_FILE)


def _key_store(ca_dir: Path, key_store_file: Path | None, env: str, no_pass: bool,
               *, confirm: bool = False) -> KeyStore:
    config = _key_store_config(ca_dir, key_store_file)
    return open_store(config, lambda: passphrase(env, no_pass, what="CA", confirm=confirm))


def _require_ca(ca_dir: Path) -> None:
    if not (ca_dir / CA_CERT_FILE).exists():
        raise IdentityError(f"no CA in {ca_dir} (run `pqcnet ca init --dir {ca_dir}` first)")


def _load(ca_dir: Path, env: str, no_pass: bool,
          key_store_file: Path | None) -> tuple[MeshCA, KeyStore]:
    """The CA and its key store (``ca.save(dir, key_store=...)`` leaves the key alone)."""
    _require_ca(ca_dir)
    store = _key_store(ca_dir, key_store_file, env, no_pass)
    return MeshCA.load(ca_dir, key_store=store), store


@contextlib.contextmanager
def _changing(ca_dir: Path, command: str, env: str, no_pass: bool,
              key_store_file: Path | None) -> Iterator[tuple[MeshCA, KeyStore]]:
    """:func:`_load` under the directory's writer lock, held by ``pqcnet ca <command>``
    until the caller's block (which saves) ends; refused while ``ca serve`` runs there
    (:mod:`pqcnet.identity.ca_lock`)."""
    from pqcnet.identity.ca_lock import ca_writer

    _require_ca(ca_dir)  # before the lock: its file only in a CA directory
    with ca_writer(ca_dir, f"pqcnet ca {command}"):
        yield _load(ca_dir, env, no_pass, key_store_file)


@click.group()
def cli() -> None:
    """Mesh certificate authority: ML-DSA-65 certificates with SPIFFE IDs; `serve` runs it
    as the enrollment service."""


@cli.command()
@_ca_options
@click.option("--trust-domain", required=True, help="e.g. example.org")
@click.option("--role", "roles", multiple=True, help="Allowed role (repeat); default any.")
@click.option("--tenant", "tenants", multiple=True, help="Allowed tenant (repeat); default any.")
@click.option("--max-ttl", type=DURATION, default="24h", show_default=True,
              help="Cap on any certificate's lifetime.")
@click.option("--default-ttl", type=DURATION, default="12h", show_default=True)
@click.option("--validity", type=DURATION, default="365d", show_default=True,
              help="Lifetime of the CA certificate itself.")
@click.option("--spiffe-layout", "layouts", multiple=True, type=LAYOUT,
              help="SPIFFE IDs of another shape this CA signs, with where tenant and role "
              "sit: TEMPLATE[,role=R][,tenant=T] (repeat), e.g. "
              "'spiffe://corp.example/ns/{tenant}/sa/{node},role=sidecar'.")
@click.option("--force", is_flag=True, help="Overwrite an existing CA in --dir.")
def init(ca_dir: Path, key_store_file: Path | None, passphrase_env: str, no_passphrase: bool,
         trust_domain: str, roles: tuple[str, ...], tenants: tuple[str, ...],
         max_ttl: dt.timedelta, default_ttl: dt.timedelta, validity: dt.timedelta,
         layouts: tuple[SpiffeLayout, ...], force: bool) -> None:
    """Create a new CA (fresh ML-DSA-65 key) in --dir."""
    if ((ca_dir / CA_KEY_FILE).exists() or (ca_dir / CA_CERT_FILE).exists()) and not force:
        raise IdentityError(f"{ca_dir} already holds a CA (use --force to replace it)")
    policy = IssuancePolicy(allowed_roles=roles, allowed_tenants=tenants, max_ttl=max_ttl,
                            default_ttl=default_ttl, spiffe_layouts=layouts)
    config = _key_store_config(ca_dir, key_store_file) if key_store_file else (
        key_store_config(None, default_dir=ca_dir, default_key_file=CA_KEY_FILE))
    store = open_store(config, lambda: passphrase(passphrase_env, no_passphrase,
                                                  what="new CA", confirm=True))
    ca = MeshCA.create(trust_domain, validity=validity, policy=policy)
    store.store(ca.key)
    ca.save(ca_dir, key_store=store)
    if key_store_file is not None:
        atomic_write(ca_dir / CA_KEY_STORE_FILE,
                     yaml.safe_dump(config.to_mapping(), sort_keys=False).encode())
    else:
        (ca_dir / CA_KEY_STORE_FILE).unlink(missing_ok=True)
    click.echo(f"CA for {trust_domain} created in {ca_dir} (key: {store.describe()}, "
               f"valid until {ca.certificate.not_valid_after_utc:%Y-%m-%d})")


@cli.command()
@_ca_options
@click.argument("spiffe_id")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the node identity (key.pem, cert.pem, bundle.pem, crl.pem).")
@click.option("--ttl", type=DURATION, default=None, help="Certificate lifetime (default: policy).")
@click.option("--node-passphrase-env", default=PASS_ENV, show_default=True,
              help="Environment variable with the passphrase for the node key.")
@click.option("--no-node-passphrase", is_flag=True, help="Store the node key unencrypted.")
def issue(ca_dir: Path, key_store_file: Path | None, passphrase_env: str, no_passphrase: bool,
          spiffe_id: str, out: Path, ttl: dt.timedelta | None, node_passphrase_env: str,
          no_node_passphrase: bool) -> None:
    """Generate a node key and certificate for SPIFFE_ID (spiffe://td/tenant/role/node)."""
    sid = SpiffeId.parse(spiffe_id)
    node_pw = passphrase(node_passphrase_env, no_node_passphrase, what="node key", confirm=True)
    with _changing(ca_dir, "issue", passphrase_env, no_passphrase,
                   key_store_file) as (ca, store):
        node = ca.issue(sid, ttl)
        ca.save(ca_dir, key_store=store)
    node.save(out, node_pw)
    click.echo(f"issued {sid} serial {node.serial:x} valid until {node.not_after.isoformat()} "
               f"-> {out}")


@cli.command("sign-csr")
@_ca_options
@click.argument("csr", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the signed certificate (PEM).")
@click.option("--ttl", type=DURATION, default=None, help="Certificate lifetime (default: policy).")
def sign_csr(ca_dir: Path, key_store_file: Path | None, passphrase_env: str,
             no_passphrase: bool, csr: Path, out: Path, ttl: dt.timedelta | None) -> None:
    """Check a CSR against the CA policy and sign it."""
    with _changing(ca_dir, "sign-csr", passphrase_env, no_passphrase,
                   key_store_file) as (ca, store):
        cert_pem = ca.sign_csr(read_bounded(csr, 1 << 20, "CSR"), ttl=ttl)
        ca.save(ca_dir, key_store=store)
    atomic_write(out, cert_pem)
    cert = load_certs(cert_pem)[0]
    click.echo(f"signed serial {cert.serial_number:x} valid until "
               f"{cert.not_valid_after_utc.isoformat()} -> {out}")


@cli.command()
@functools.partial(_ca_options, dir_required=False)
@click.option("--ca", "ca_url", default="",
              help="Revoke through this CA service (https://host:port, POST /v1/revoke) "
              "instead of in --dir: use it while `ca serve` runs on the directory (the "
              "service does not re-read it); the CRL it serves lists the serial at once.")
@click.option("--identity", "identity_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="With --ca: an admin identity directory (the service's --admin "
              f"patterns); its key passphrase from ${PASS_ENV}.")
@click.option("--serial", help="Serial number (hex) to revoke.")
@click.option("--cert", "cert_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Certificate file to revoke.")
@click.option("--spiffe-id", help="Revoke every unexpired certificate issued for this ID.")
@click.option("--reason", default="unspecified", show_default=True,
              help="key_compromise, superseded, cessation_of_operation, ...")
def revoke(ca_dir: Path | None, key_store_file: Path | None, passphrase_env: str,
           no_passphrase: bool, ca_url: str, identity_dir: Path | None, serial: str | None,
           cert_file: Path | None, spiffe_id: str | None, reason: str) -> None:
    """Revoke a certificate in the CA directory (publish it with `pqcnet ca crl`), or
    through the CA service with --ca and an admin --identity."""
    if sum(x is not None for x in (serial, cert_file, spiffe_id)) != 1:
        raise click.UsageError("give exactly one of --serial, --cert, --spiffe-id")
    if ca_url:
        if ca_dir is not None:
            raise click.UsageError("give --dir (revoke offline) or --ca (the service), not both")
        _revoke_remote(ca_url, identity_dir, serial, cert_file, spiffe_id, reason)
        return
    if ca_dir is None:
        raise click.UsageError("give --dir (the CA directory) or --ca (the CA service)")
    if identity_dir is not None:
        raise click.UsageError("--identity is for --ca (the caller the service checks)")
    number: int | None = None
    if serial is not None:
        try:
            number = int(serial, 16)
        except ValueError:
            raise click.BadParameter(f"serial {serial!r} is not hexadecimal") from None
    cert = (load_certs(read_bounded(cert_file, 1 << 20, "certificate"))[0]
            if cert_file is not None else None)
    with _changing(ca_dir, "revoke", passphrase_env, no_passphrase,
                   key_store_file) as (ca, store):
        if number is not None:
            revs = [ca.revoke(number, reason)]
        elif cert is not None:
            revs = [ca.revoke(cert, reason)]
        else:
            revs = ca.revoke_spiffe_id(str(spiffe_id), reason)
        ca.save(ca_dir, key_store=store)
    for rev in revs:
        click.echo(f"revoked serial {rev.serial:x} ({rev.reason.name})")


def _revoke_remote(ca_url: str, identity_dir: Path | None, serial: str | None,
                   cert_file: Path | None, spiffe_id: str | None, reason: str) -> None:
    """POST /v1/revoke as the admin identity (:func:`pqcnet.runtime.enroll.revoke`)."""
    import asyncio

    from pqcnet.runtime import enroll as client

    if identity_dir is None:
        raise click.UsageError("--ca needs --identity (an admin identity directory)")
    number: int | None = None
    if serial is not None:
        try:
            number = int(serial, 16)
        except ValueError:
            raise click.BadParameter(f"serial {serial!r} is not hexadecimal") from None
    elif cert_file is not None:
        number = load_certs(read_bounded(cert_file, 1 << 20, "certificate"))[0].serial_number
    admin = load_identity(identity_dir)
    asyncio.run(client.revoke(ca_url, admin, serial=number, spiffe_id=spiffe_id,
                              reason=reason))
    what = f"serial {number:x}" if number is not None else str(spiffe_id)
    click.echo(f"revoked {what} ({reason}) through {ca_url}")


@cli.command()
@_ca_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the CRL here (default: stdout).")
@click.option("--validity", type=DURATION, default="1h", show_default=True,
              help="nextUpdate distance: nodes should refresh before then.")
def crl(ca_dir: Path, key_store_file: Path | None, passphrase_env: str, no_passphrase: bool,
        out: Path | None, validity: dt.timedelta) -> None:
    """Sign and print a fresh CRL (PEM); any node verifies it with the trust bundle."""
    with _changing(ca_dir, "crl", passphrase_env, no_passphrase,
                   key_store_file) as (ca, store):
        pem = ca.crl_pem(validity=validity)
        ca.save(ca_dir, key_store=store)
    parsed = load_crl(pem, ca.trust_bundle_pem())
    if out is None:
        click.echo(pem.decode(), nl=False)
    else:
        atomic_write(out, pem)
        click.echo(f"CRL #{parsed.number} with {len(parsed.revoked)} revoked -> {out}")


@cli.command()
@click.option("--dir", "ca_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def bundle(ca_dir: Path) -> None:
    """Print the trust bundle (CA certificates, PEM). Needs no passphrase."""
    click.echo(read_bounded(ca_dir / "ca-cert.pem", 1 << 22, "trust bundle").decode(), nl=False)


@cli.command("show")
@click.argument("identity_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--passphrase-env", default=PASS_ENV, show_default=True)
@click.option("--no-passphrase", is_flag=True)
def show(identity_dir: Path, passphrase_env: str, no_passphrase: bool) -> None:
    """Load a node identity directory (checks key, chain, CRL) and describe it."""
    node = NodeIdentity.load(identity_dir, passphrase(passphrase_env, no_passphrase, what="node"))
    crl_info = "none"
    if node.crl_pem is not None:
        parsed = load_crl(node.crl_pem, node.trust_bundle_pem)
        crl_info = f"#{parsed.number}, {len(parsed.revoked)} revoked"
    click.echo(f"{node.spiffe_id}\n  serial {node.serial:x}\n  valid {node.not_before.isoformat()}"
               f" .. {node.not_after.isoformat()}\n  key {node.key.algorithm}\n  CRL {crl_info}")


# --------------------------------------------------------------------------- service


@cli.command("serve")
@_ca_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--advertise-host", default="",
              help="Name or address other nodes reach this service by, in the URLs it hands "
              "out (the CRL URL of the enroll answer, the ready line); default: --host, "
              "which must then not be a wildcard such as 0.0.0.0.")
@click.option("--port", type=int, default=8443, show_default=True,
              help="HTTPS port (PQ TLS: X25519MLKEM768, ML-DSA certificate); 0 = any free.")
@click.option("--crl-http-port", type=int, default=None,
              help="Also serve GET /v1/crl on plain HTTP here (the CRL is signed).")
@click.option("--ledger", "ledger_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="QS-DAG ledger recording issuances/revocations "
              "(default: --dir/ledger).")
@click.option("--max-nodes-per-tenant", type=int, default=0, show_default=True,
              help="Distinct live SPIFFE IDs per tenant (0 = no limit).")
@click.option("--allow-tenant", "allow_tenants", multiple=True,
              help="Tenant that may enroll (repeat; default: any the CA policy allows).")
@click.option("--attest-role", "attest_roles", multiple=True,
              help="Role that must enroll/rotate with an attestation (repeat).")
@click.option("--package-hash", "package_hashes", multiple=True,
              help="Accepted package hash (hex) for attested roles (repeat; default: this "
              "installation's).")
@click.option("--admin", "admins", multiple=True,
              help="SPIFFE pattern allowed to revoke (repeat; default spiffe://TD/*/admin/*).")
@click.option("--enroll-rate", type=float, default=20.0, show_default=True,
              help="Enrollments per second per client address.")
@click.option("--enroll-burst", type=int, default=40, show_default=True)
@click.option("--cert-ttl", type=DURATION, default=None,
              help="Lifetime of issued certificates (default: the CA policy's).")
@click.option("--bootstrap-peer", "bootstrap_peers", multiple=True,
              help="Returned to enrolling nodes in config.bootstrap_peers (repeat).")
@click.option("--gossip-fanout", type=int, default=3, show_default=True)
@click.option("--crl-max-age", type=int, default=30, show_default=True,
              help="Seconds: Cache-Control max-age of /v1/crl and CRL re-signing interval.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics (pqcnet_ca_*) on this port.")
@click.option("--spiffe-layout", "layouts", multiple=True, type=LAYOUT,
              help="Replace the CA policy's SPIFFE layouts (see `ca init`; saved with the "
              "CA's state): TEMPLATE[,role=R][,tenant=T] (repeat).")
def serve(ca_dir: Path, key_store_file: Path | None, passphrase_env: str, no_passphrase: bool,
          host: str, advertise_host: str, port: int, crl_http_port: int | None,
          ledger_dir: Path | None, max_nodes_per_tenant: int, allow_tenants: tuple[str, ...],
          attest_roles: tuple[str, ...], package_hashes: tuple[str, ...],
          admins: tuple[str, ...], enroll_rate: float, enroll_burst: int,
          cert_ttl: dt.timedelta | None, bootstrap_peers: tuple[str, ...],
          gossip_fanout: int, crl_max_age: int, metrics_port: int | None,
          layouts: tuple[SpiffeLayout, ...]) -> None:
    """Run the CA as a service (seed 001 §7): enroll, rotate, crl, revoke, mesh/peers.

    Prints one JSON line {"ready": true, "url": ...} once listening; serves until
    SIGINT/SIGTERM."""

    from pqcnet.cli._common import run_until_signalled
    from pqcnet.identity.tokens import TokenStore
    from pqcnet.qsdag.attestation import MeasurementPolicy, package_hash
    from pqcnet.qsdag.ledger import Ledger
    from pqcnet.runtime.ca_service import CaService, CaServiceConfig

    # the directory's writer for as long as it serves: `ca issue/revoke/crl --dir`
    # beside it are refused instead of being undone by its next state write
    with _changing(ca_dir, "serve", passphrase_env, no_passphrase,
                   key_store_file) as (ca, _store):
        if layouts:
            ca.policy = dataclasses.replace(ca.policy, spiffe_layouts=layouts)
        try:
            hashes = frozenset(bytes.fromhex(h) for h in package_hashes) or frozenset(
                {package_hash()})
        except ValueError:
            raise click.BadParameter("--package-hash must be hex") from None
        public = advertise_host or host
        public = f"[{public}]" if ":" in public else public  # an IPv6 literal in a URL
        scheme_host = f"{public}:{{port}}"
        config = CaServiceConfig(
            max_nodes_per_tenant=max_nodes_per_tenant, allowed_tenants=allow_tenants,
            attest_roles=attest_roles,
            measurements=MeasurementPolicy(package_hashes=hashes) if attest_roles else None,
            admin_patterns=admins, enroll_rate=enroll_rate, enroll_burst=enroll_burst,
            cert_ttl=cert_ttl, bootstrap_peers=bootstrap_peers, gossip_fanout=gossip_fanout,
            crl_url=(f"http://{public}:{crl_http_port}/v1/crl" if crl_http_port else ""),
            crl_max_age_s=crl_max_age)
        ledger = Ledger.open(ledger_dir or (ca_dir / "ledger"), sync=True)

        async def start() -> CaService:
            service = CaService(ca, ca_dir, TokenStore(ca_dir), config, ledger=ledger)
            await service.start(host, port, crl_http_port)  # also starts its maintenance loop
            if metrics_port is not None:
                from prometheus_client import start_http_server

                start_http_server(metrics_port, addr=host)
            return service

        async def stop(service: CaService) -> None:
            await service.close()
            ledger.close()

        def ready(service: CaService) -> None:
            bound = service.server.port if service.server else port
            click.echo(json.dumps({
                "ready": True, "url": "https://" + scheme_host.format(port=bound),
                "port": bound, "trust_domain": ca.trust_domain,
                "crl_http_port": service.plain.port if service.plain else None}))
            import sys

            sys.stdout.flush()

        run_until_signalled(start, stop, ready)


@cli.group("token")
def token() -> None:
    """One-time enrollment tokens for `pqcnet node enroll`."""


@token.command("list")
@click.option("--dir", "ca_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="CA directory.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def token_list(ca_dir: Path, as_json: bool) -> None:
    """The CA's tokens (hash prefix, binding, expiry, state; never a secret)."""
    from pqcnet.identity.certs import utcnow
    from pqcnet.identity.tokens import TokenStore

    now = utcnow()
    rows = [{"hash": r.token_hash[:16], "pattern": r.pattern, "role": r.role,
             "expires_at": r.expires_at.isoformat(timespec="seconds"),
             "state": r.state(now),
             "used_by": r.used_by}
            for r in sorted(TokenStore(ca_dir).records(), key=lambda r: r.created_at)]
    if as_json:
        click.echo(json.dumps({"tokens": rows}))
        return
    for r in rows:
        click.echo(f"{r['hash']}  {r['state']:7}  {r['expires_at']}  {r['role']:10}  "
                   f"{r['pattern']}" + (f"  used by {r['used_by']}" if r["used_by"] else ""))


@token.command("revoke")
@click.option("--dir", "ca_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="CA directory.")
@click.argument("hash_prefix")
def token_revoke(ca_dir: Path, hash_prefix: str) -> None:
    """Withdraw an unused token (HASH_PREFIX: 8+ hex digits from `ca token list`); a
    node presenting it is then refused as unknown."""
    from pqcnet.identity.tokens import TokenStore

    rec = TokenStore(ca_dir).revoke(hash_prefix)
    click.echo(f"token {rec.token_hash[:16]} for {rec.pattern} (role {rec.role}) revoked")


@token.command("create")
@click.option("--dir", "ca_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="CA directory (needs no passphrase: only the token's hash is stored).")
@click.option("--pattern", required=True,
              help="SPIFFE pattern the node may ask for, e.g. spiffe://td/acme/relayer/*")
@click.option("--role", required=True, help="Role of the certificate (the ID's role segment).")
@click.option("--ttl", type=DURATION, default="1h", show_default=True,
              help="How long the token can be redeemed.")
@click.option("--ca-url", default="", help="https://host:port of `pqcnet ca serve` (recorded "
              "in the bundle; the node may also pass --ca).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Token bundle file to hand to the node (mode 0600; holds the secret).")
def token_create(ca_dir: Path, pattern: str, role: str, ttl: dt.timedelta, ca_url: str,
                 out: Path) -> None:
    """Create a single-use token and write the bundle (token + CA bundle) for the node;
    carry it by hand for an air-gapped site."""
    from pqcnet.identity.tokens import TokenBundle, TokenStore, write_bundle

    if not (ca_dir / CA_CERT_FILE).exists():
        raise IdentityError(f"no CA in {ca_dir}")
    bundle_pem = read_bounded(ca_dir / CA_CERT_FILE, 1 << 22, "trust bundle")
    if not load_certs(bundle_pem, "trust bundle"):
        raise IdentityError(f"{ca_dir / CA_CERT_FILE} holds no certificate")
    secret, rec = TokenStore(ca_dir).create(pattern, role, ttl,
                                            layouts=stored_policy(ca_dir).spiffe_layouts)
    write_bundle(out, TokenBundle(secret, pattern, role, rec.expires_at, bundle_pem, ca_url))
    click.echo(f"token for {pattern} (role {role}) valid until {rec.expires_at.isoformat()} "
               f"-> {out}")
