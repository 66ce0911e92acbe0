"""Development certificates: one CA and one key pair per daemon and client.

`twopc-coordinator certs --out DIR --coordinator coord1 --participant shard1 --client app`
writes `DIR/ca.pem` (the CA certificate; its key `ca.key` stays beside it so that more
certificates can be issued later with the same command) and `DIR/NAME.pem` /
`DIR/NAME.key` per identity. Each certificate carries its identity as a URI SAN
(`twopc://KIND/NAME`, see `twopc_common.auth`) and, for daemons, the DNS names and
addresses clients dial (the name itself, `localhost`, `127.0.0.1` and any `--host`).

These are for development and tests: a production deployment issues the same SANs from
its own CA. Keys are written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twopc_common.errors import TwoPCError
from twopc_common.ids import check_name

CERT_VALIDITY_DAYS = 825
"""Lifetime of a development certificate (the longest most TLS stacks accept)."""

KINDS = ("coordinator", "participant", "client")


@dataclass(frozen=True, slots=True)
class Identity:
    kind: str
    """coordinator, participant or client."""
    name: str

    @property
    def uri(self) -> str:
        return f"twopc://{self.kind}/{self.name}"


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Where one identity's certificate, key and the CA that signed it are."""

    cert: Path
    key: Path
    ca: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_or_make_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own: verifiers find an issuer by name, so two CAs trusted together
    # during a rotation must not share one.
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"twopc development CA {os.urandom(4).hex()}")]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _hosts(identity: Identity, hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    if identity.kind == "client":
        return []
    names: list[x509.GeneralName] = []
    for host in (identity.name, "localhost", "127.0.0.1", *hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return list(dict.fromkeys(names))


def issue(
    out: Path, identities: list[Identity], hosts: tuple[str, ...] = ()
) -> dict[str, CertFiles]:
    """Write the CA (unless `out` already has one) and a certificate per identity."""
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _load_or_make_ca(out)
    now = dt.datetime.now(dt.UTC)
    files = {}
    for identity in identities:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(identity.uri),
            *_hosts(identity, hosts),
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_VALIDITY_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = out / f"{identity.name}.pem", out / f"{identity.name}.key"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[identity.name] = CertFiles(cert_path, key_path, out / "ca.pem")
    return files


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="twopc-coordinator certs",
        description="Write a development CA and one certificate per daemon and client. "
        "An existing CA in --out is reused, so certificates can be added or renewed.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write to")
    for kind in KINDS:
        p.add_argument(
            f"--{kind}", action="append", default=[], metavar="NAME", help=f"a {kind} (repeatable)"
        )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="another DNS name or address the daemons are dialled by (repeatable)",
    )
    a = p.parse_args(argv)
    try:
        identities = [
            Identity(kind, check_name(kind, name)) for kind in KINDS for name in getattr(a, kind)
        ]
    except TwoPCError as exc:
        p.error(str(exc))
    names = [i.name for i in identities]
    if not identities:
        p.error("name at least one --coordinator, --participant or --client")
    if len(set(names)) != len(names):
        p.error("every identity needs its own name (its files are NAME.pem and NAME.key)")
    for name, f in issue(a.out, identities, tuple(a.host)).items():
        print(f"{name}: {f.cert} {f.key}")
    print(f"CA: {a.out / 'ca.pem'}")
