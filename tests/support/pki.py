"""A test CA with an intermediate, and a server certificate for loopback,
written the way certbot lays them out (fullchain.pem, privkey.pem)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path  # the root clients trust
    fullchain: Path  # leaf + intermediate
    privkey: Path
    cert_dir: Path  # a directory with ca.crt, as skopeo's --cert-dir wants


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, key, signer, *, ca: bool, sans=None, days: int = 30):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path, common_name: str = "mirrord test server") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("mirrord test root", "mirrord test root", root_key, root_key, ca=True)
    inter = _cert("mirrord test intermediate", "mirrord test root", inter_key, root_key, ca=True)
    sans = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    leaf = _cert(common_name, "mirrord test intermediate", leaf_key, inter_key, ca=False, sans=sans)
    ca = directory / "ca.pem"
    ca.write_bytes(_pem(root))
    fullchain = directory / "fullchain.pem"
    fullchain.write_bytes(_pem(leaf) + _pem(inter))
    privkey = directory / "privkey.pem"
    privkey.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cert_dir = directory / "certs.d"
    cert_dir.mkdir(exist_ok=True)
    (cert_dir / "ca.crt").write_bytes(_pem(root))
    return Pki(ca, fullchain, privkey, cert_dir)
