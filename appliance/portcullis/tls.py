"""The STARTTLS server context: the configured pair, or a self-signed one made on first start.

config.check() has made sure the pair loads, or that its directory can be made."""

from __future__ import annotations

import datetime
import logging
import os
import ssl

from .config import SELF_SIGNED_PAIR, Tls

log = logging.getLogger("portcullis.tls")


def _pair(tls: Tls, hostname: str) -> tuple[str, str]:
    if tls.cert_file:
        return tls.cert_file, tls.key_file
    return _self_signed_pair(tls.generated_dir, hostname)


def server_context(tls: Tls, hostname: str) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    cert, key = _pair(tls, hostname)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(cert, key)
    return context


def certificate_expiry(tls: Tls, hostname: str) -> tuple[str, float] | None:
    """The certificate file STARTTLS presents and its notAfter (Unix time); None with TLS off."""
    if not tls.enabled:
        return None
    from cryptography import x509

    cert, _ = _pair(tls, hostname)
    with open(cert, "rb") as f:
        certificate = x509.load_pem_x509_certificate(f.read())
    return cert, certificate.not_valid_after_utc.timestamp()


def _self_signed_pair(directory: str, hostname: str) -> tuple[str, str]:
    cert_path, key_path = (os.path.join(directory, name) for name in SELF_SIGNED_PAIR)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(directory, mode=0o700, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    key_bytes = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(key_bytes)
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    log.info("generated a self-signed TLS certificate for %s in %s", hostname, directory)
    return cert_path, key_path
