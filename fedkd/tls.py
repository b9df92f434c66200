"""A development certificate authority for the hub and its teachers (``fedkd certs``).

For trying fedkd across machines, on loopback, and in tests: one CA, a server
certificate for the hub's names and addresses, and optionally one client
certificate per teacher (common name = the teacher's name) for mutual TLS.
Keys are ECDSA P-256 and written with mode 0600. A consortium in production
would use its own PKI; the hub and the agents only need PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedkd.files import write_atomic


class CertificateError(ValueError):
    """A certificate or key file cannot be used; the message names the file and why."""


def read_certificates(path: str | Path, what: str) -> bytes:
    """The PEM bytes of ``path``, checked to hold at least one X.509 certificate that is valid now."""
    data = _read_pem(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{what} {str(path)!r} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----' "
                               "block that parses)") from None
    now = datetime.datetime.now(datetime.UTC)
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertificateError(f"{what} {str(path)!r} is not valid now (valid from "
                                   f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")
    return data


def read_private_key(path: str | Path, what: str) -> bytes:
    """The PEM bytes of ``path``, checked to hold an unencrypted private key."""
    data = _read_pem(path, what)
    try:
        serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{what} {str(path)!r} is not an unencrypted PEM private key ({exc})") from None
    return data


def _read_pem(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise CertificateError(f"{what} {str(p)!r} does not exist")
    return p.read_bytes()


@dataclass(frozen=True)
class DevPKI:
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # teacher name -> (certificate, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedkd development CA"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


PUBLIC = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    write_atomic(path, data, private=private)  # a killed coordinator leaves no half-written CA or key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, ca_key: ec.EllipticCurvePrivateKey,
           *, days: int, ca: bool = False, sans: Sequence[str] = (), usage: x509.ObjectIdentifier | None = None
           ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if sans:
        names: list[x509.GeneralName] = []
        for host in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_dev_pki(directory: str | Path, *, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                 clients: Sequence[str] = (), days: int = 30) -> DevPKI:
    """Create a CA, a server certificate for ``hosts`` and a client certificate per name in ``clients``.

    Writes ca.pem, ca.key, server.pem, server.key and <client>.pem / <client>.key
    into ``directory``. Existing files are overwritten.
    """
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or address")
    d = Path(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedkd development CA")
    ca_cert = _issue("fedkd development CA", ca_key, ca_name, ca_key, days=days, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(hosts[0], server_key, ca_name, ca_key, days=days, sans=hosts,
                         usage=ExtendedKeyUsageOID.SERVER_AUTH)
    pem = serialization.Encoding.PEM
    _write(d / "ca.pem", ca_cert.public_bytes(pem))
    _write(d / "ca.key", _key_pem(ca_key), private=True)
    _write(d / "server.pem", server_cert.public_bytes(pem))
    _write(d / "server.key", _key_pem(server_key), private=True)
    issued = {}
    for name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, key, ca_name, ca_key, days=days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        _write(d / f"{name}.pem", cert.public_bytes(pem))
        _write(d / f"{name}.key", _key_pem(key), private=True)
        issued[name] = (d / f"{name}.pem", d / f"{name}.key")
    return DevPKI(d, d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key", issued)


def make_supernode_key(directory: str | Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format for Flower's SuperNode authentication
    (what ``ssh-keygen -t ecdsa -b 384 -N ''`` makes): <name> (private, 0600) and <name>.pub."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = d / name, d / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def _covers(cert: x509.Certificate, hosts: Sequence[str]) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(sans.get_values_for_type(x509.DNSName))
    return all(h in names for h in hosts)


def run_pki(directory: str | Path, *, hosts: Sequence[str], days: int = 30) -> DevPKI:
    """The run's development CA in ``directory``: reused when it is there, so that a restarted (resumed)
    coordinator keeps the teachers that trust it; made when it is not.

    A server certificate that has expired (or will within a day) or does not list every name in ``hosts`` is
    issued again by the same CA, which the teachers already hold. A CA that is unreadable or expired stops
    with a message: a new CA would lock out every teacher holding the old one.
    """
    d = Path(directory)
    ca_pem, ca_key_pem = d / "ca.pem", d / "ca.key"
    if not ca_pem.exists() and not ca_key_pem.exists():
        return make_dev_pki(d, hosts=hosts, days=days)
    try:
        ca_cert = x509.load_pem_x509_certificate(read_certificates(ca_pem, "the run's CA certificate"))
        ca_key = serialization.load_pem_private_key(read_private_key(ca_key_pem, "the run's CA key"), password=None)
    except CertificateError as exc:
        raise CertificateError(f"{exc}; the teachers of this run trust that CA: restore the file, or delete "
                               f"{str(d)!r} and give every teacher the new {str(ca_pem)!r}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"the run's CA key {str(ca_key_pem)!r} is not an ECDSA key made by fedkd")
    server_pem, server_key_pem = d / "server.pem", d / "server.key"
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    reuse = False
    if server_pem.exists() and server_key_pem.exists():
        try:
            cert = x509.load_pem_x509_certificate(server_pem.read_bytes())
            key = serialization.load_pem_private_key(server_key_pem.read_bytes(), password=None)
            matches = cert.public_key().public_bytes(*PUBLIC) == key.public_key().public_bytes(*PUBLIC)
            reuse = (matches and cert.issuer == ca_cert.subject and cert.not_valid_after_utc > soon
                     and _covers(cert, hosts))
        except ValueError:
            reuse = False
    if not reuse:
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = _issue(hosts[0], server_key, ca_cert.subject, ca_key, days=days, sans=hosts,
                             usage=ExtendedKeyUsageOID.SERVER_AUTH)
        _write(server_pem, server_cert.public_bytes(serialization.Encoding.PEM))
        _write(server_key_pem, _key_pem(server_key), private=True)
    clients = {p.stem: (p, p.with_suffix(".key")) for p in sorted(d.glob("*.pem"))
               if p.stem not in ("ca", "server") and p.with_suffix(".key").exists()}
    return DevPKI(d, ca_pem, ca_key_pem, server_pem, server_key_pem, clients)
