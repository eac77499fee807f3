"""The secret that turns tenant names into KV cache salts nobody else can compute.

A prefix-cache salt derived from a public name (`sha256("soberana-tenant:" + name)`) lets
anyone who can reach a backend send that salt and time the answer, probing another tenant's
cached prompts. Salts are therefore HMAC-SHA256 of the tenant under a secret that only the
server (or gateway) holds. Replicas and restarts that should reuse each other's cached
blocks (shared KV tiers) must be given the same secret; without one, each process draws a
random secret, which is safe but shares no tenant-salted block across processes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

logger = logging.getLogger("soberana.tenant_salt")

SECRET_ENV = "SOBERANA_TENANT_SALT_SECRET"
SECRET_FILE_ENV = "SOBERANA_TENANT_SALT_SECRET_FILE"
MIN_SECRET_BYTES = 16


def load_salt_secret(path: str | None = None, who: str = "server") -> bytes:
    """The secret from `path`, else $SOBERANA_TENANT_SALT_SECRET_FILE, else
    $SOBERANA_TENANT_SALT_SECRET, else a random one for this process (logged)."""
    path = path or os.environ.get(SECRET_FILE_ENV) or None
    if path is not None:
        file = Path(path).expanduser()
        try:
            secret = file.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the tenant salt secret file {path}: {exc.strerror}") from exc
        if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("tenant salt secret file %s is readable by other users; chmod 600 it", path)
        source = f"file {path}"
    elif os.environ.get(SECRET_ENV):
        secret = os.environ[SECRET_ENV].encode()
        source = f"${SECRET_ENV}"
    else:
        logger.info(
            "%s: no tenant salt secret given (--tenant-salt-secret-file or $%s): using a random "
            "one, so tenant-salted KV blocks are not reused across restarts or replicas",
            who, SECRET_ENV,
        )
        return secrets.token_bytes(32)
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the tenant salt secret from {source} has {len(secret)} bytes; it needs at least "
            f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return secret


def derive_salt(secret: bytes, *parts: str) -> str:
    """HMAC-SHA256 of `parts` (length-prefixed, so no two part lists collide), as hex."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        mac.update(len(data).to_bytes(8, "big") + data)
    return mac.hexdigest()
