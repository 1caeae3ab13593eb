"""TLS for every hop: a development CA (`switchyard certs`), and the SSL contexts and gRPC
credentials the services and clients build from its files.

One folder holds the CA, one server certificate (localhost, 127.0.0.1 and any extra names)
presented by the gateway, nats-server and the workers, and one client certificate per service
role for mutual TLS: the router and the batchers to NATS, the batchers to their worker, and an
`observer` for tests and tools, and the `autoscaler` (it reads heartbeats and demand from NATS).
Private keys are written 0600 from creation. A development CA
is not a production PKI: the point is that the same code paths (verify the peer, present a
client certificate) run in development and tests as they would with real certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from switchyard.bus.auth import write_private
from switchyard.config import ConfigError

CLIENT_ROLES = ("router", "batcher", "observer", "autoscaler")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsDir:
    """The files `switchyard certs` writes, by role."""

    path: Path

    @property
    def ca(self) -> Path:
        return self.path / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.path / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.path / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.path / "server-key.pem"

    def client_cert(self, role: str) -> Path:
        return self.path / f"{role}.pem"

    def client_key(self, role: str) -> Path:
        return self.path / f"{role}-key.pem"

    def check(self) -> "TlsDir":
        """Raise ConfigError naming the first missing file (and how to make them)."""
        files = [self.ca, self.server_cert, self.server_key]
        for role in CLIENT_ROLES:
            files += [self.client_cert(role), self.client_key(role)]
        for f in files:
            if not f.is_file():
                raise ConfigError(f"TLS folder {self.path}: {f.name} is missing; "
                                  f"create the folder with `switchyard certs --out {self.path}`")
        return self


def check_pair(name: str, cert: Path | None, key: Path | None, ca: Path | None = None) -> None:
    """A service's TLS settings: cert and key together, and every named file present."""
    if (cert is None) != (key is None):
        raise ConfigError(f"{name}: give both a certificate and its key, or neither")
    for path in (cert, key, ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"{name}: TLS file {path} does not exist (make a development set with `switchyard certs`)")


# ---- generation ----------------------------------------------------------------------------
def _new_key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(path, pem.decode())


def _write_cert(path: Path, cert) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _sans(hosts: Iterable[str]) -> list:  # type: ignore[type-arg]
    from cryptography import x509
    out: list = []  # type: ignore[type-arg]
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def make_dev_ca(out: Path, hosts: Iterable[str] = DEFAULT_HOSTS, days: int = 365) -> TlsDir:
    """Write a fresh CA, a server certificate for `hosts` and a client certificate per role
    into `out` (created 0700). Existing files are replaced: every certificate in the folder
    comes from the one CA in it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    tls = TlsDir(out)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Switchyard development"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = _new_key()
    ca_name = name("Switchyard development CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    _write_key(tls.ca_key, ca_key)
    _write_cert(tls.ca, ca_cert)

    def issue(cn: str, usage: x509.ObjectIdentifier, cert_path: Path, key_path: Path,
              sans: list | None = None) -> None:  # type: ignore[type-arg]
        _issue(ca_key, ca_name, cn, usage, cert_path, key_path, start, end, sans)

    hosts = list(dict.fromkeys(hosts))
    issue("switchyard-server", ExtendedKeyUsageOID.SERVER_AUTH, tls.server_cert, tls.server_key, _sans(hosts))
    for role in CLIENT_ROLES:
        issue(f"switchyard-{role}", ExtendedKeyUsageOID.CLIENT_AUTH, tls.client_cert(role), tls.client_key(role))
    return tls


def _issue(ca_key, ca_name, cn: str, usage, cert_path: Path, key_path: Path,  # type: ignore[no-untyped-def]
           start: datetime.datetime, end: datetime.datetime, sans: list | None = None) -> None:  # type: ignore[type-arg]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Switchyard development"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    _write_key(key_path, key)
    _write_cert(cert_path, builder.sign(ca_key, hashes.SHA256()))


def add_missing_client_certs(path: Path, days: int = 365) -> list[str]:
    """Issue, from the CA in `path`, a client certificate for each role that has none yet (a
    folder made before a role existed, e.g. `autoscaler`); returns the roles issued. Why: the
    certificates already handed out stay valid, unlike a fresh `switchyard certs`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID
    tls = TlsDir(path)
    missing = [r for r in CLIENT_ROLES if not (tls.client_cert(r).is_file() and tls.client_key(r).is_file())]
    if not missing:
        return []
    if not (tls.ca.is_file() and tls.ca_key.is_file()):
        raise ConfigError(f"TLS folder {path}: no ca.pem and ca-key.pem to issue {missing} from; "
                          f"create the folder with `switchyard certs --out {path}`")
    ca_cert = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), min(now + datetime.timedelta(days=days),
                                                           ca_cert.not_valid_after_utc)
    for role in missing:
        _issue(ca_key, ca_cert.subject, f"switchyard-{role}", ExtendedKeyUsageOID.CLIENT_AUTH,
               tls.client_cert(role), tls.client_key(role), start, end)
    return missing


# ---- use -----------------------------------------------------------------------------------
def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Verifies the server against `ca` (hostname included); presents `cert` when given (mTLS).
    For nats-py (`tls=`), httpx (`verify=`) and urllib."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def grpc_server_credentials(cert: Path, key: Path, client_ca: Path | None = None):  # type: ignore[no-untyped-def]
    """Server credentials; with `client_ca`, a client must present a certificate it signed."""
    import grpc
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                       root_certificates=client_ca.read_bytes() if client_ca else None,
                                       require_client_auth=client_ca is not None)


def grpc_channel_credentials(ca: Path, cert: Path | None = None, key: Path | None = None):  # type: ignore[no-untyped-def]
    import grpc
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(),
                                        private_key=key.read_bytes() if key else None,
                                        certificate_chain=cert.read_bytes() if cert else None)


def nats_tls_block(tls: TlsDir, verify: bool = True) -> str:
    """nats-server `tls {}`: every client must speak TLS, and (verify) present a certificate
    signed by the CA."""
    import json
    return (f"tls {{\n  cert_file: {json.dumps(str(tls.server_cert))}\n  key_file: {json.dumps(str(tls.server_key))}\n"
            f"  ca_file: {json.dumps(str(tls.ca))}\n  verify: {'true' if verify else 'false'}\n  timeout: 2\n}}\n")
