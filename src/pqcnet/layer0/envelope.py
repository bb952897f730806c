"""IBC-style envelopes: what we hand to a chain so a relayer can check it.

``payload_hash`` is computed exactly like an IBC ICS-04 (ibc-go v1 packet)
commitment, so an IBC relayer or light client can recompute it::

    payload_hash = SHA-256( be64(timeout_timestamp)            # ns since epoch, 0 = none
                          ‖ be64(timeout_height.revision_number)
                          ‖ be64(timeout_height.revision_height)
                          ‖ SHA-256(data) )

where ``data`` is the serialized ``pqcnet.layer0.EpochAnchor``. The anchoring node
signs (ML-DSA, FIPS 204 context ``pqcnet/layer0/envelope/v1``)::

    lp(b"pqcnet/layer0/envelope/v1") ‖ lp(channel) ‖ be64(sequence) ‖ payload_hash
    ‖ lp(signer) ‖ be32(key_version)

so the signature covers the data and timeouts through the commitment.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.crypto.pqc import SigningKey, VerifyKey, length_prefixed
from pqcnet.layer0.errors import EnvelopeInvalid
from pqcnet.proto import layer0_pb2

DOMAIN = b"pqcnet/layer0/envelope/v1"
#: Largest packet data carried (an EpochAnchor is ~150 bytes).
MAX_DATA = 64 * 1024


def packet_commitment(data: bytes, timeout_timestamp: int, revision_number: int,
                      revision_height: int) -> bytes:
    """ICS-04 packet commitment (module docstring)."""
    buf = struct.pack(">QQQ", timeout_timestamp, revision_number, revision_height)
    return hashlib.sha256(buf + hashlib.sha256(data).digest()).digest()


@dataclass(frozen=True, slots=True)
class EpochAnchor:
    """The packet data: which ledger positions an epoch covers, and their Merkle root."""

    network: str
    epoch: int
    first_position: int
    last_position: int
    count: int
    merkle_root: bytes

    def encode(self) -> bytes:
        return layer0_pb2.EpochAnchor(
            network=self.network, epoch=self.epoch, first_position=self.first_position,
            last_position=self.last_position, count=self.count, merkle_root=self.merkle_root,
        ).SerializeToString(deterministic=True)

    @classmethod
    def decode(cls, data: bytes) -> EpochAnchor:
        msg = layer0_pb2.EpochAnchor()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise EnvelopeInvalid(f"epoch anchor does not decode: {exc}") from None
        if len(msg.merkle_root) != 32 or msg.count == 0:
            raise EnvelopeInvalid("epoch anchor needs a 32-byte root and count > 0")
        return cls(msg.network, msg.epoch, msg.first_position, msg.last_position, msg.count,
                   msg.merkle_root)


@dataclass(frozen=True, slots=True)
class IBCEnvelope:
    """A signed, sequenced commitment to one packet of data on a channel."""

    channel: str
    sequence: int
    payload_hash: bytes
    signature: bytes
    data: bytes
    signer: str
    key_version: int = 1
    timeout_timestamp: int = 0
    #: (revision_number, revision_height); (0, 0) = no height timeout
    timeout_height: tuple[int, int] = (0, 0)

    def signed_bytes(self) -> bytes:
        return (length_prefixed(DOMAIN, self.channel.encode())
                + struct.pack(">Q", self.sequence) + self.payload_hash
                + length_prefixed(self.signer.encode()) + struct.pack(">I", self.key_version))

    def to_proto(self) -> layer0_pb2.IBCEnvelope:
        return layer0_pb2.IBCEnvelope(
            channel=self.channel, sequence=self.sequence, payload_hash=self.payload_hash,
            signature=self.signature, data=self.data,
            timeout_height=layer0_pb2.Height(revision_number=self.timeout_height[0],
                                             revision_height=self.timeout_height[1]),
            timeout_timestamp=self.timeout_timestamp, signer=self.signer,
            key_version=self.key_version)

    @classmethod
    def from_proto(cls, m: layer0_pb2.IBCEnvelope) -> IBCEnvelope:
        return cls(m.channel, m.sequence, m.payload_hash, m.signature, m.data, m.signer,
                   m.key_version, m.timeout_timestamp,
                   (m.timeout_height.revision_number, m.timeout_height.revision_height))

    def to_json(self) -> dict[str, object]:
        return {"channel": self.channel, "sequence": self.sequence,
                "payload_hash": self.payload_hash.hex(), "signature": self.signature.hex(),
                "data": self.data.hex(), "signer": self.signer, "key_version": self.key_version,
                "timeout_timestamp": self.timeout_timestamp,
                "timeout_height": list(self.timeout_height)}

    @classmethod
    def from_json(cls, o: dict[str, object]) -> IBCEnvelope:
        try:
            th = o.get("timeout_height", [0, 0])
            return cls(str(o["channel"]), int(o["sequence"]),  # type: ignore[call-overload]
                       bytes.fromhex(str(o["payload_hash"])), bytes.fromhex(str(o["signature"])),
                       bytes.fromhex(str(o["data"])), str(o["signer"]),
                       int(o.get("key_version", 1)),  # type: ignore[call-overload]
                       int(o.get("timeout_timestamp", 0)),  # type: ignore[call-overload]
                       (int(th[0]), int(th[1])))  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvelopeInvalid(f"malformed envelope JSON: {exc}") from None


def make_envelope(channel: str, sequence: int, data: bytes, signer_id: str, signer: SigningKey,
                  *, key_version: int = 1, timeout_timestamp: int = 0,
                  timeout_height: tuple[int, int] = (0, 0)) -> IBCEnvelope:
    """Commit to ``data`` ICS-04 style and sign the envelope."""
    if len(data) > MAX_DATA:
        raise EnvelopeInvalid(f"packet data over {MAX_DATA} bytes")
    env = IBCEnvelope(channel, sequence,
                      packet_commitment(data, timeout_timestamp, *timeout_height), b"", data,
                      signer_id, key_version, timeout_timestamp, timeout_height)
    return replace(env, signature=signer.sign(env.signed_bytes(), context=DOMAIN))


def verify_envelope(env: IBCEnvelope, key: VerifyKey) -> EpochAnchor:
    """Recompute the commitment, check the signature; return the decoded anchor."""
    expected = packet_commitment(env.data, env.timeout_timestamp, *env.timeout_height)
    if env.payload_hash != expected:
        raise EnvelopeInvalid(f"{env.channel}#{env.sequence}: payload commitment mismatch")
    try:
        key.verify(env.signature, env.signed_bytes(), context=DOMAIN)
    except SignatureInvalid as exc:
        raise EnvelopeInvalid(f"{env.channel}#{env.sequence}: {exc}") from None
    return EpochAnchor.decode(env.data)
