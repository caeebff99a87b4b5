"""The TLS contexts of this process: one for origin URLs (the system's roots), one for
peers (an agent's --tls-ca, when given). Shared by the node's fetches and the fleet's
agent clients, so neither imports the other just for them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from weightship.errors import UsageError

_SSL_CONTEXT: Any = None
_SSL_LOCK = threading.Lock()


def shared_ssl_context() -> Any:
    """One TLS context for every HTTP client of this process: building one loads the CA
    bundle (about 50 ms of CPU), which a status of 50 agents, or 50 agents each starting
    a warm on a small machine, would otherwise pay 50 times over."""
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            import ssl

            import certifi

            _SSL_CONTEXT = ssl.create_default_context(cafile=certifi.where())
        return _SSL_CONTEXT


_PEER_CONTEXT: Any = None


def configure_tls_ca(path: Path | str) -> None:
    """Make the CA certificates in ``path`` (PEM) the only roots a peer's certificate may
    chain to (``agent serve --tls-ca``): a region's agents serve certificates of a private
    CA, and a certificate some public CA issued for a peer's address must not pass. Origin
    URLs (presigned links to public object stores) keep the system's roots."""
    import ssl

    global _PEER_CONTEXT
    # PROTOCOL_TLS_CLIENT checks certificates and host names, and trusts no root but ours.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=str(path))
    except FileNotFoundError:
        raise UsageError(f"CA file {path} not found") from None
    except ssl.SSLError as e:  # an OSError too: caught first
        raise UsageError(f"{path} holds no PEM CA certificate ({e.reason or e})") from None
    except OSError as e:
        raise UsageError(f"cannot read CA file {path}: {e.strerror}") from None
    with _SSL_LOCK:
        _PEER_CONTEXT = ctx


def peer_ssl_context() -> Any:
    """The TLS context https peers are checked with: the --tls-ca roots, else the shared one."""
    return _PEER_CONTEXT if _PEER_CONTEXT is not None else shared_ssl_context()


__all__ = ["configure_tls_ca", "peer_ssl_context", "shared_ssl_context"]
