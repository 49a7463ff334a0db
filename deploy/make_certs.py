#!/usr/bin/env python3
"""Make the TLS and authentication material of a Mix-of-Show deployment.

    python deploy/make_certs.py --out certs --san server.example.org --san 10.0.0.5 \
        --client alice --client bob

writes, into ``--out``:

- ``ca.pem`` / ``ca.key``: a private certificate authority (keep ``ca.key`` offline);
- ``server.pem`` / ``server.key``: the server's certificate, signed by the CA, for every
  ``--san`` (DNS names and IP addresses; ``localhost`` and ``127.0.0.1`` are always added),
  used by the SuperLink and the model hub;
- ``clients/<name>`` / ``clients/<name>.pub``: an ECDSA P-384 key pair per SuperNode in
  OpenSSH format (what Flower's SuperNode authentication reads; the same pair signs model
  hub requests). The operator registers the ``.pub`` files; each user keeps their
  private key.

Existing files are never overwritten (``--force`` to replace them), so adding a client
later is the same command with a new ``--client``: the CA and server certificate stay.
Needs only ``cryptography`` (installed with this package).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool, force: bool) -> bool:
    if path.exists() and not force:
        print(f"kept     {path} (exists)")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)
    print(f"wrote    {path}")
    return True


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mix-of-show-flower"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mix-of-show CA"))
        .issuer_name(_name("mix-of-show CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    names: list[x509.GeneralName] = []
    for san in dict.fromkeys([*sans, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0] if sans else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_client_keys(out: Path, name: str, force: bool) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if (out / name).exists() and not force:
        print(f"kept     {out / name} (exists)")
        return
    _write(out / name, private, private=True, force=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode(), private=False, force=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("certs"))
    p.add_argument("--san", action="append", default=[], help="server DNS name or IP (repeat)")
    p.add_argument("--client", action="append", default=[], help="a SuperNode's name (repeat)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--force", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    for name in args.client:
        if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
            p.error(f"client name {name!r}: use letters, digits, '-' and '_' only")
    out = args.out
    ca_key_path, ca_path = out / "ca.key", out / "ca.pem"
    if ca_path.exists() and ca_key_path.exists() and not args.force:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        print(f"kept     {ca_path} (exists)")
    else:
        ca_key, ca_cert = make_ca(args.days * 5)
        _write(ca_key_path, _pem_key(ca_key), private=True, force=True)
        _write(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), False, True)
    if not (out / "server.pem").exists() or args.force:
        key, cert = make_server_cert(ca_key, ca_cert, args.san, args.days)
        _write(out / "server.key", _pem_key(key), private=True, force=True)
        _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM), False, True)
    else:
        print(f"kept     {out / 'server.pem'} (exists; --force to reissue with new SANs)")
    for name in args.client:
        make_client_keys(out / "clients", name, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
