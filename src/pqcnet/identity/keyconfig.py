"""The ``key_store:`` config seam: which backend holds a node's or the CA's key.

One mapping, the same in a node file, a CA's ``key-store.yaml`` and Helm values::

    key_store:
      kind: file                     # file | pkcs11 | shamir
      key_file: key.pem              # file: PKCS#8 PEM (default <identity dir>/key.pem)
      passphrase_env: PQCNET_NODE_PASSPHRASE   # file: null = unencrypted

    key_store:
      kind: pkcs11
      module: /usr/lib/softhsm/libsofthsm2.so
      token_label: pqcnet
      pin_env: PQCNET_PKCS11_PIN     # the PIN itself never sits in a file
      kek_label: pqcnet-kek
      wrapped_key_file: key.wrapped  # default <identity dir>/key.wrapped

    key_store:
      kind: shamir
      manifest: key.shares.json      # public: public key + share digests
      share_files: [a.json, b.json]  # local shares (dev/test), or:
      custodians:                    # share services over QSTP (pqcnet.runtime.shares)
        - {address: 127.0.0.1:7001, spiffe_id: spiffe://td/ops/custodian/c1}
      client_identity: bootstrap-id  # identity dir that authenticates us to custodians
      client_key_store: {kind: file} # its key (file or pkcs11), default file
      timeout_s: 10
      shares: 5                      # only for storing (splitting) a new key
      threshold: 3
      share_dir: shares-out

:class:`KeyStoreConfig` is a flat frozen dataclass (easy to port to the typed config
schema); :func:`key_store_config` validates a mapping into one, naming the key on any
mistake; :func:`open_key_store` turns it into a :class:`~pqcnet.identity.keystore.KeyStore`,
reading secrets (passphrase, PIN) from the environment only then. Relative paths
resolve against ``base_dir`` (the config file's directory); omitted files default
into ``default_dir`` (the identity or CA directory).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.identity.errors import KeyStoreError
from pqcnet.identity.hsm import DEFAULT_KEK_LABEL, DEFAULT_MODULE, Pkcs11KeyStore
from pqcnet.identity.keystore import FileKeyStore, KeyStore
from pqcnet.identity.shamir import FileShareSource, ShamirKeyStore, ShareSource, check_counts
from pqcnet.identity.spiffe import SpiffeId

KeyStoreKind = Literal["file", "pkcs11", "shamir"]
DEFAULT_PASSPHRASE_ENV = "PQCNET_NODE_PASSPHRASE"
DEFAULT_PIN_ENV = "PQCNET_PKCS11_PIN"
DEFAULT_SHARE_TIMEOUT_S = 10.0
#: Most custodians one key may list (SLIP-39 caps a split at 16 shares).
MAX_CUSTODIANS = 16

#: which fields each kind may set (``kind`` aside)
_FIELDS: dict[str, frozenset[str]] = {
    "file": frozenset({"key_file", "passphrase_env"}),
    "pkcs11": frozenset({"module", "token_label", "pin_env", "kek_label", "wrapped_key_file"}),
    "shamir": frozenset({"manifest", "share_files", "custodians", "client_identity",
                         "client_key_store", "timeout_s", "shares", "threshold", "share_dir"}),
}


@dataclass(frozen=True, slots=True)
class CustodianConfig:
    """One share service a starting node asks for its share."""

    #: ``host:port`` of the custodian's ``pqcnet keys share-serve``
    address: str
    #: the custodian's SPIFFE ID: the node talks only to a peer presenting it
    spiffe_id: str

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)


@dataclass(frozen=True, slots=True)
class KeyStoreConfig:
    """Which key store holds a key, and its (non-secret) settings. See the module doc."""

    kind: KeyStoreKind = "file"
    # -- file
    key_file: Path | None = None
    passphrase_env: str | None = DEFAULT_PASSPHRASE_ENV
    # -- pkcs11
    module: Path = DEFAULT_MODULE
    token_label: str = ""
    pin_env: str = DEFAULT_PIN_ENV
    kek_label: str = DEFAULT_KEK_LABEL
    wrapped_key_file: Path | None = None
    # -- shamir
    manifest: Path | None = None
    share_files: tuple[Path, ...] = ()
    custodians: tuple[CustodianConfig, ...] = ()
    client_identity: Path | None = None
    client_key_store: KeyStoreConfig | None = None
    timeout_s: float = DEFAULT_SHARE_TIMEOUT_S
    shares: int = 0
    threshold: int = 0
    share_dir: Path | None = None
    #: where omitted files live (the identity or CA directory)
    default_dir: Path = field(default=Path("."))

    def __post_init__(self) -> None:
        if self.kind not in get_args(KeyStoreKind):
            raise KeyStoreError(f"key_store.kind must be one of "
                                f"{', '.join(get_args(KeyStoreKind))}, got {self.kind!r}")
        if self.kind == "pkcs11" and not self.token_label:
            raise KeyStoreError("key_store.token_label is required for kind pkcs11")
        if self.kind == "shamir":
            self._check_shamir()

    def _check_shamir(self) -> None:
        if len(self.custodians) > MAX_CUSTODIANS:
            raise KeyStoreError(f"key_store.custodians: at most {MAX_CUSTODIANS}")
        if self.custodians and self.client_identity is None:
            raise KeyStoreError("key_store.client_identity is required with custodians "
                                "(the identity that authenticates us to them)")
        if self.client_key_store is not None and self.client_key_store.kind == "shamir":
            raise KeyStoreError("key_store.client_key_store cannot itself be shamir")
        if self.timeout_s <= 0:
            raise KeyStoreError("key_store.timeout_s must be positive")
        if self.shares or self.threshold:
            check_counts(self.shares, self.threshold)

    def to_mapping(self) -> dict[str, Any]:
        """The mapping :func:`key_store_config` reads back (absolute paths, no secrets)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "file":
            out.update(key_file=_abs(self.key_path), passphrase_env=self.passphrase_env)
        elif self.kind == "pkcs11":
            out.update(module=_abs(self.module), token_label=self.token_label,
                       pin_env=self.pin_env, kek_label=self.kek_label,
                       wrapped_key_file=_abs(self.wrapped_path))
        else:
            out.update(manifest=_abs(self.manifest_path),
                       share_files=[_abs(p) for p in self.share_files],
                       custodians=[{"address": c.address, "spiffe_id": c.spiffe_id}
                                   for c in self.custodians],
                       timeout_s=self.timeout_s)
            if self.client_identity is not None:
                out["client_identity"] = _abs(self.client_identity)
            if self.client_key_store is not None:
                out["client_key_store"] = self.client_key_store.to_mapping()
            if self.shares:
                out.update(shares=self.shares, threshold=self.threshold)
            if self.share_dir is not None:
                out["share_dir"] = _abs(self.share_dir)
        return out

    @property
    def key_path(self) -> Path:
        """file: the PEM key file."""
        return self.key_file or self.default_dir / "key.pem"

    @property
    def wrapped_path(self) -> Path:
        """pkcs11: the wrapped-key blob."""
        return self.wrapped_key_file or self.default_dir / "key.wrapped"

    @property
    def manifest_path(self) -> Path:
        """shamir: the public share manifest."""
        return self.manifest or self.default_dir / "key.shares.json"


def key_store_config(
    mapping: Mapping[str, Any] | None,
    *,
    base_dir: Path = Path("."),
    default_dir: Path | None = None,
    default_key_file: str = "key.pem",
) -> KeyStoreConfig:
    """Validate a ``key_store:`` mapping (None = the default file store)."""
    default_dir = Path(default_dir if default_dir is not None else base_dir)
    if not isinstance(mapping, Mapping | None):
        raise KeyStoreError("key_store must be a mapping")
    data = dict(mapping or {})
    kind = data.pop("kind", "file")
    if kind not in _FIELDS:
        raise KeyStoreError(f"key_store.kind must be one of {', '.join(_FIELDS)}, got {kind!r}")
    unknown = sorted(set(data) - _FIELDS[kind])
    if unknown:
        known = {f.name for f in fields(KeyStoreConfig)}
        why = "is not a field of kind " + kind if unknown[0] in known else "is unknown"
        raise KeyStoreError(f"key_store.{unknown[0]} {why}")

    def path(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise KeyStoreError(f"key_store.{key} must be a path")
        return base_dir / Path(value)

    def text(key: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            raise KeyStoreError(f"key_store.{key} must be a string")
        return value

    def number(key: str, default: float, whole: bool = False) -> Any:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
            raise KeyStoreError(f"key_store.{key} must be {'an integer' if whole else 'a number'}")
        return value

    kwargs: dict[str, Any] = {"kind": kind, "default_dir": default_dir}
    if kind == "file":
        kwargs["key_file"] = path("key_file") or default_dir / default_key_file
        env = data.get("passphrase_env", DEFAULT_PASSPHRASE_ENV)
        if env is not None and not isinstance(env, str):
            raise KeyStoreError("key_store.passphrase_env must be a string or null")
        kwargs["passphrase_env"] = env
    elif kind == "pkcs11":
        kwargs.update(module=path("module") or DEFAULT_MODULE,
                      token_label=text("token_label", ""), pin_env=text("pin_env", DEFAULT_PIN_ENV),
                      kek_label=text("kek_label", DEFAULT_KEK_LABEL),
                      wrapped_key_file=path("wrapped_key_file"))
    else:
        kwargs.update(
            manifest=path("manifest"), share_dir=path("share_dir"),
            share_files=tuple(_path(base_dir, p) for p in _list(data, "share_files")),
            custodians=tuple(_custodian(c, i) for i, c in enumerate(_list(data, "custodians"))),
            client_identity=path("client_identity"),
            timeout_s=float(number("timeout_s", DEFAULT_SHARE_TIMEOUT_S)),
            shares=number("shares", 0, whole=True), threshold=number("threshold", 0, whole=True),
        )
        client = data.get("client_key_store")
        if client is not None:
            if not isinstance(client, Mapping):
                raise KeyStoreError("key_store.client_key_store must be a mapping")
            kwargs["client_key_store"] = key_store_config(
                client, base_dir=base_dir, default_dir=kwargs["client_identity"] or default_dir)
    return KeyStoreConfig(**kwargs)


def read_key_store_file(path: Path, *, default_dir: Path | None = None,
                        default_key_file: str = "key.pem") -> KeyStoreConfig:
    """A YAML file holding the mapping, at top level or under ``key_store:``.

    Relative paths in it resolve against the file's directory."""
    path = Path(path)
    doc = read_yaml_file(path, KeyStoreError, what="key store config")
    if isinstance(doc, Mapping) and set(doc) == {"key_store"}:
        doc = doc["key_store"]
    if not isinstance(doc, Mapping):
        raise KeyStoreError(f"key store config {path} must be a mapping (kind: file|pkcs11|shamir)")
    return key_store_config(doc, base_dir=path.parent, default_dir=default_dir,
                            default_key_file=default_key_file)


def open_key_store(
    config: KeyStoreConfig,
    *,
    share_source: ShareSource | None = None,
    passphrase: bytes | None = None,
    pin: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> KeyStore:
    """Build the configured store. Secrets: ``passphrase``/``pin`` if given, else the
    environment variable the config names. Custodians need ``share_source`` (see
    :func:`pqcnet.runtime.shares.open_key_store`, which supplies it)."""
    env = os.environ if environ is None else environ
    if config.kind == "file":
        if passphrase is None and config.passphrase_env:
            value = env.get(config.passphrase_env)
            passphrase = value.encode() if value else None
        return FileKeyStore(config.key_path, passphrase)
    if config.kind == "pkcs11":
        if pin is None:
            pin = env.get(config.pin_env)
        if not pin:
            raise KeyStoreError(f"PKCS#11 PIN missing: set ${config.pin_env}")
        return Pkcs11KeyStore(config.wrapped_path, token_label=config.token_label, pin=pin,
                              module=config.module, kek_label=config.kek_label)
    if share_source is None and config.custodians:
        raise KeyStoreError("a Shamir key store with custodians is opened by "
                            "pqcnet.runtime.shares.open_key_store (it needs QSTP)")
    if share_source is None and config.share_files:
        share_source = FileShareSource(config.share_files)
    return ShamirKeyStore(config.manifest_path, share_source, share_dir=config.share_dir,
                          shares=config.shares, threshold=config.threshold)


def _abs(path: Path) -> str:
    return str(Path(path).absolute())


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list | tuple):
        raise KeyStoreError(f"key_store.{key} must be a list")
    return list(value)


def _path(base_dir: Path, value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise KeyStoreError("key_store.share_files entries must be paths")
    return base_dir / value


def _custodian(value: object, i: int) -> CustodianConfig:
    where = f"key_store.custodians[{i}]"
    if not isinstance(value, Mapping) or set(value) != {"address", "spiffe_id"}:
        raise KeyStoreError(f"{where} must be a mapping with exactly address and spiffe_id")
    address, sid = str(value["address"]), str(value["spiffe_id"])
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KeyStoreError(f"{where}.address must be host:port, got {address!r}")
    SpiffeId.parse(sid)
    return CustodianConfig(address, sid)
