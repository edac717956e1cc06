"""Makes a private CA, a certificate for each service, and tokens: what
compose's secrets and a first Kubernetes install need, and what the tests
make at run time. For production, prefer your own PKI or cert-manager.

    python -m conveyor_common.certs --out .secrets
    python -m conveyor_common.certs --out .secrets --renew   # new service certificates,
                                                             # same CA and tokens
    # .secrets/ca.crt, ca.key
    # .secrets/<service>.crt, <service>.key   for scheduler, llm-worker, tool-gateway
    # .secrets/api-tokens        the public API's tokens (one per line)
    # .secrets/scheduler-token   the token the scheduler shows the worker and gateway
    # .secrets/internal-tokens   the tokens the worker and gateway accept

Each certificate names its service (common name and DNS SAN), the names it
has in Kubernetes (`<service>.<namespace>.svc[.cluster.local]`), localhost,
127.0.0.1, and any --extra-name; it is good for both server and client use,
so the scheduler presents its own to the worker and gateway.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("scheduler", "llm-worker", "tool-gateway")
VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str = "conveyor-ca") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
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
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, dns_names: list[str]
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for `common_name`, signed by the CA, for
    server and client authentication, naming `dns_names` and 127.0.0.1."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(dns_names)]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def service_names(service: str, namespace: str, extra: list[str]) -> list[str]:
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        "localhost",
        *extra,
    ]


def new_token() -> str:
    return secrets.token_hex(32)


def _write(path: Path, data: bytes, private: bool, readable: bool = False) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600 if private and not readable else 0o644)


def write_bundle(
    out: Path,
    services: tuple[str, ...] = SERVICES,
    namespace: str = "conveyor",
    extra_names: list[str] | None = None,
    readable_keys: bool = False,
    renew: bool = False,
) -> None:
    """Everything the module docstring lists, into `out`. `readable_keys`:
    service keys and tokens readable by any uid (compose bind-mounts its
    file secrets with the host's modes, and the containers run as uid
    10001), with `out` itself closed to everyone but its owner instead.
    `renew`: keep the CA and the tokens already in `out`, and issue new
    service certificates from that CA (what rotation wants: running
    services trust the new certificates without a restart)."""
    out.mkdir(parents=True, exist_ok=True)
    if readable_keys:
        os.chmod(out, 0o700)
    if renew:
        ca_cert, ca_key = (out / "ca.crt").read_bytes(), (out / "ca.key").read_bytes()
    else:
        ca_cert, ca_key = make_ca()
        _write(out / "ca.crt", ca_cert, private=False)
        _write(out / "ca.key", ca_key, private=True)
    for service in services:
        cert, key = make_cert(
            ca_cert, ca_key, service, service_names(service, namespace, extra_names or [])
        )
        _write(out / f"{service}.crt", cert, private=False)
        _write(out / f"{service}.key", key, private=True, readable=readable_keys)
    if renew:
        return
    scheduler_token = new_token()
    for name, token in (
        ("api-tokens", new_token()),
        ("scheduler-token", scheduler_token),
        ("internal-tokens", scheduler_token),
    ):
        _write(out / name, f"{token}\n".encode(), private=True, readable=readable_keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".secrets", help="directory to write into")
    parser.add_argument("--namespace", default="conveyor", help="Kubernetes namespace for SANs")
    parser.add_argument(
        "--extra-name", action="append", default=[], help="another DNS name on every certificate"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    parser.add_argument(
        "--renew",
        action="store_true",
        help="new service certificates from the existing CA; the CA and tokens stay",
    )
    parser.add_argument(
        "--readable-keys",
        action="store_true",
        help="keys and tokens readable by the containers' uid, in a directory only you can "
        "enter (for compose's file secrets)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.renew and not (out / "ca.key").exists():
        raise SystemExit(f"--renew needs the CA in {out}/ca.crt and {out}/ca.key")
    if (out / "ca.crt").exists() and not (args.force or args.renew):
        raise SystemExit(
            f"{out}/ca.crt exists: --renew issues new certificates from it, --force replaces "
            "the whole bundle (CA and tokens: restart every service and client after)"
        )
    write_bundle(
        out,
        namespace=args.namespace,
        extra_names=args.extra_name,
        readable_keys=args.readable_keys,
        renew=args.renew,
    )
    print(f"wrote a CA, {len(SERVICES)} service certificates and tokens to {out}/")


if __name__ == "__main__":
    main()
