"""The hub's credentials: its TLS certificate and key (and a client CA for mutual TLS), and one bearer token per
teacher, issued into files the operator hands to each institution."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ServerTLS:
    """PEM bytes: the hub's certificate chain and key; ``client_ca`` turns on mutual TLS."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def issue_tokens(directory: str | Path, names: Sequence[str]) -> dict[str, str]:
    """One bearer token per teacher in ``directory/<name>.token`` (mode 0600); existing ones are kept,
    so a resumed run admits the same agents. Returns name -> token, in the order given."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tokens = {}
    for name in names:
        path = d / f"{name}.token"
        if path.exists():
            token = path.read_text().strip()
            if not token:
                raise ValueError(f"token file {str(path)!r} is empty; delete it to issue a new token")
        else:
            token = secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        tokens[name] = token
    return tokens
