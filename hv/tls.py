"""x509 credentials for migration over TLS, laid out as QEMU's tls-creds-x509
reads them: a directory with

    ca-cert.pem                       the CA both sides trust
    server-cert.pem, server-key.pem   the destination (endpoint "server")
    client-cert.pem, client-key.pem   the source (endpoint "client")

Both sides verify each other (mutual TLS, 1.2 or newer): the source checks the
destination's certificate against the CA and the host name it dialed; the
destination requires a client certificate signed by the CA and, with authz,
one whose subject CN is in that list.

    python -m hv.tls make-creds DIR [--hostname NAME ...] [--client-name NAME]

writes a fresh CA, server and client certificate and key (keys mode 0600).
The building blocks (make_ca, make_cert, write_creds) serve tests too.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import ssl
import sys
from dataclasses import dataclass, field

from .errors import HvError

CA_CERT = "ca-cert.pem"
FILES = {"server": ("server-cert.pem", "server-key.pem"),
         "client": ("client-cert.pem", "client-key.pem")}
ENDPOINTS = tuple(FILES)


class TlsError(HvError):
    """Credentials that cannot be used; the message names the file."""


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise TlsError(f"TLS credentials: {path} is missing ({what}); create the directory "
                       f"with: python -m hv.tls make-creds {os.path.dirname(path) or '.'}")
    if not os.access(path, os.R_OK):
        raise TlsError(f"TLS credentials: {path} is not readable by this user ({what}); fix "
                       f"its owner or mode")


@dataclass
class TlsCredentials:
    """One credentials directory. endpoint None: either side may use it
    (a directory made by make-creds holds both); "server"/"client" checks
    that side's files at once. authz: subject CNs of sources the server
    accepts (None: any certificate the CA signed)."""
    dir: str
    endpoint: str | None = None
    authz: list[str] | None = None
    verify_peer: bool = True
    id: str = ""
    _checked: set = field(default_factory=set, repr=False)

    def __post_init__(self):
        if self.endpoint is not None and self.endpoint not in ENDPOINTS:
            raise TlsError(f"TLS credentials: endpoint {self.endpoint!r} must be 'server' "
                           f"or 'client'")
        if not os.path.isdir(self.dir):
            raise TlsError(f"TLS credentials: {self.dir} is not a directory; create it with: "
                           f"python -m hv.tls make-creds {self.dir}")
        _check_file(self._path(CA_CERT), "the CA certificate")
        if self.endpoint is not None:
            self._context(self.endpoint)      # fail now, naming the file, not mid-migration

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _context(self, endpoint: str) -> ssl.SSLContext:
        cert, key = (self._path(n) for n in FILES[endpoint])
        _check_file(cert, f"the {endpoint}'s certificate")
        _check_file(key, f"the {endpoint}'s private key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if endpoint == "server"
                             else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=self._path(CA_CERT))
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"TLS credentials: {self._path(CA_CERT)} is not a PEM certificate "
                           f"({e}); make new credentials with python -m hv.tls make-creds")
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            what = ("does not belong to" if "KEY_VALUES_MISMATCH" in str(e)
                    else "or its certificate cannot be read as PEM for")
            raise TlsError(f"TLS credentials: {key} {what} {cert} ({e.reason or e}); make "
                           f"new credentials with python -m hv.tls make-creds") from None
        except OSError as e:
            raise TlsError(f"TLS credentials: cannot read {cert} or {key}: {e}") from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """The destination's: presents server-cert.pem, requires a client
        certificate the CA signed."""
        ctx = self._context("server")
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, hostname: str | None = None) -> ssl.SSLContext:
        """The source's: presents client-cert.pem, verifies the destination's
        certificate against the CA and (check_hostname) the name it dialed."""
        ctx = self._context("client")
        # verify-peer off (QEMU's option, client only): encrypted, not authenticated
        ctx.check_hostname = self.verify_peer
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx

    def with_authz(self, authz: list[str] | None) -> "TlsCredentials":
        """The same credentials admitting only client CNs in authz."""
        return TlsCredentials(self.dir, self.endpoint, authz, self.verify_peer, self.id)

    def authorize(self, peercert: dict | None) -> str | None:
        """None when authz admits this client certificate, else why not."""
        if self.authz is None:
            return None
        cn = peer_cn(peercert)
        if cn in self.authz:
            return None
        return (f"client certificate CN {cn!r} is not in tls-authz "
                f"({', '.join(self.authz) or 'empty'})")


def objects(machine) -> dict:
    """The machine's credentials objects by id (QMP object-add, run-guest
    --tls-dir's tls0)."""
    objs = getattr(machine, "tls_objects", None)
    if objs is None:
        objs = machine.tls_objects = {}
    return objs


def peer_cn(peercert: dict | None) -> str | None:
    for rdn in (peercert or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


# ------------------------------------------------------------- making them

def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def make_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str = "hv"):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "hv migration CA", days: int = 3650):
    """(certificate, key) of a self-signed CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    key = make_key()
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_cert(ca, cn: str, *, server: bool, hostnames=(), days: int = 825,
              not_before=None, not_after=None):
    """(certificate, key) signed by ca ((cert, key) of make_ca). A server
    certificate carries hostnames (DNS names or IP addresses) as SAN."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID
    ca_cert, ca_key = ca
    key = make_key()
    now = _now()
    nb = not_before or now - datetime.timedelta(minutes=5)
    na = not_after or now + datetime.timedelta(days=days)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(nb).not_valid_after(na)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                else ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False))
    sans = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def write_pem(path: str, cert=None, key=None) -> None:
    from cryptography.hazmat.primitives import serialization
    if cert is not None:
        _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if key is not None:
        _write(path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)


def write_creds(dir: str, ca=None, server=None, client=None) -> None:
    """Write whichever of ca, server, client ((cert, key) pairs) are given."""
    os.makedirs(dir, exist_ok=True)
    if ca is not None:
        write_pem(os.path.join(dir, CA_CERT), cert=ca[0])
    for endpoint, pair in (("server", server), ("client", client)):
        if pair is not None:
            cert_name, key_name = FILES[endpoint]
            write_pem(os.path.join(dir, cert_name), cert=pair[0])
            write_pem(os.path.join(dir, key_name), key=pair[1])


def make_creds(dir: str, hostnames=("localhost",), client_name: str = "hv-source") -> None:
    """A CA and a server and client certificate signed by it, in dir. The
    server's SAN holds hostnames and always 127.0.0.1 and ::1."""
    names = list(dict.fromkeys([*hostnames, "127.0.0.1", "::1"]))
    ca = make_ca()
    server = make_cert(ca, names[0], server=True, hostnames=names)
    client = make_cert(ca, client_name, server=False)
    write_creds(dir, ca, server, client)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hv.tls",
                                description="TLS credentials for hv's migration")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-creds", help="write a CA, server and client certificates and "
                                          "keys into DIR (QEMU's tls-creds-x509 layout)")
    m.add_argument("dir", metavar="DIR")
    m.add_argument("--hostname", action="append", default=[], metavar="NAME",
                   help="a name (or IP address) the source dials the destination by; "
                        "repeatable (127.0.0.1 and ::1 are always included; default "
                        "localhost)")
    m.add_argument("--client-name", default="hv-source", metavar="NAME",
                   help="the client certificate's CN (what tls-authz lists)")
    args = p.parse_args(argv)
    try:
        make_creds(args.dir, args.hostname or ["localhost"], args.client_name)
    except OSError as e:
        print(f"hv.tls: cannot write {args.dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"hv.tls: wrote {CA_CERT}, {', '.join(n for f in FILES.values() for n in f)} "
          f"to {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
