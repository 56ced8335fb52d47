"""Test certificates, made fresh by the ``openssl`` command (no key is committed).

:func:`make_pki` writes into a directory: a CA, a second CA the sides do not
trust, a destination certificate for ``localhost``/127.0.0.1, a source
certificate for ``source.test``, one signed by the other CA, and an expired one.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from engine.link import TlsConfig


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", f"{name}.key", cwd=cwd)


def _ca(name: str, cwd: Path) -> None:
    _key(name, cwd)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem",
             "-subj", f"/CN={name}", "-days", "2", cwd=cwd)


def _leaf(name: str, ca: str, names: str, cwd: Path, days: str = "2") -> None:
    _key(name, cwd)
    _openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=cwd)
    (cwd / f"{name}.ext").write_text(f"subjectAltName={names}\n")
    # -days -1: not after lies before not before: expired from the start
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", days, "-extfile", f"{name}.ext",
             cwd=cwd)


@dataclass(frozen=True)
class Pki:
    dir: Path

    def config(self, who: str, ca: str = "ca", peer_name: str | None = None) -> TlsConfig:
        return TlsConfig(str(self.dir / f"{who}.pem"), str(self.dir / f"{who}.key"),
                         str(self.dir / f"{ca}.pem"), peer_name)


class NoOpenssl(RuntimeError):
    """The openssl command is not installed (tests skip, the benchmark says so)."""


def make_pki(where: Path) -> Pki:
    """Fresh keys and certificates under `where` (also bench/secure.py's).  Raises NoOpenssl."""
    if shutil.which("openssl") is None:
        raise NoOpenssl("the openssl command is not installed: no test certificates")
    where.mkdir(parents=True, exist_ok=True)
    _ca("ca", where)
    _ca("other-ca", where)
    _leaf("dest", "ca", "DNS:localhost,IP:127.0.0.1", where)
    _leaf("source", "ca", "DNS:source.test", where)
    _leaf("stranger", "other-ca", "DNS:source.test", where)
    _leaf("expired", "ca", "DNS:localhost,IP:127.0.0.1", where, days="-1")
    return Pki(where)
