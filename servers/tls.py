"""TLS for a daemon: a self-signed certificate made once in its data directory.

No certificate authority is needed: clients learn who a server is from the
key handshake, whose proofs cover the SHA-256 of the certificate the client
saw (``wire.auth``), so a man in the middle with its own certificate fails.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mirrorfuse.wire.auth import fingerprint

from .files import atomic_write

CERT_NAME = "tls.crt"
KEY_NAME = "tls.key"


def make_certificate(folder: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirrorfs")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(folder / KEY_NAME, key_pem, mode=0o600)
    atomic_write(folder / CERT_NAME, cert.public_bytes(serialization.Encoding.PEM))


def server_tls(folder: Path) -> tuple[ssl.SSLContext, bytes]:
    """The TLS context of a daemon keeping its files in ``folder``, and the fingerprint
    its handshake proofs are bound to."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / CERT_NAME).exists() or not (folder / KEY_NAME).exists():
        make_certificate(folder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(folder / CERT_NAME, folder / KEY_NAME)
    pem = (folder / CERT_NAME).read_text()
    return ctx, fingerprint(ssl.PEM_cert_to_DER_cert(pem))
