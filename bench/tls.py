"""TLS material for the ``--tls`` benches, made in the run: a private CA and a certificate for
127.0.0.1 signed by it.

Made with the ``trustme`` package when it is installed, else with the ``openssl`` command line
(a self-signed certificate for 127.0.0.1 that is its own CA). Everything stays in the bench's
temporary directory; the private key is readable by the owner only.
"""

from __future__ import annotations

import importlib
import os
import shutil
import ssl
import subprocess
from pathlib import Path

import attrs

from bench.processes import WorkerError

#: The address every certificate here is issued for (the benches listen on nothing else).
TLS_HOST = "127.0.0.1"
#: Seconds ``openssl`` may take.
OPENSSL_TIMEOUT = 30.0


@attrs.frozen(kw_only=True)
class TlsFiles:
    """A CA to trust, and the server's certificate chain and private key (PEM files)."""

    ca: Path
    cert: Path
    key: Path
    #: ``trustme`` or ``openssl``: what made them.
    made_with: str

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only :attr:`ca` and verifies the host name."""
        return ssl.create_default_context(cafile=str(self.ca))

    def server_context(self) -> ssl.SSLContext:
        """A server context presenting :attr:`cert`."""
        return server_context(self.cert, self.key)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context presenting the certificate chain ``cert`` with its private ``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and a certificate for :data:`TLS_HOST` in ``directory`` (created if needed).

    Raises :class:`WorkerError` if neither trustme nor openssl is available, or openssl fails.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        trustme = importlib.import_module("trustme")
    except ImportError:
        return _with_openssl(directory)
    ca = trustme.CA()
    issued = ca.issue_cert(TLS_HOST)
    files = TlsFiles(
        ca=directory / "ca.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        made_with="trustme",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    for blob in issued.cert_chain_pems:
        blob.write_to_path(str(files.cert), append=True)
    _write_private(files.key, issued.private_key_pem.bytes())
    return files


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _with_openssl(directory: Path) -> TlsFiles:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise WorkerError(
            "--tls needs the trustme package or the openssl command (apt-get install openssl)"
        )
    cert, key = directory / "cert.pem", directory / "key.pem"
    done = subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "1", "-subj", f"/CN={TLS_HOST}"),
            *("-addext", f"subjectAltName=IP:{TLS_HOST}"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise WorkerError(f"openssl could not make a certificate: {done.stderr.strip()[:300]}")
    key.chmod(0o600)
    # Self-signed: the certificate is its own CA.
    return TlsFiles(ca=cert, cert=cert, key=key, made_with="openssl")
