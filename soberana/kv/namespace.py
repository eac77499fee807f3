"""Tenant namespaces: which tenant a shared-tier entry belongs to, so that it can be purged.

A request's `cache_salt` is `<tenant salt>|<client salt>` when the server knows the tenant
(`soberana.server.tenancy.effective_cache_salt`), or the client's own salt otherwise. Entries
of the shared tiers are keyed under a namespace derived from the part before the first `|`:
every block of one tenant, whatever salts its clients add, lands in one namespace, which
`soberana kv purge` deletes. Tenants are already kept apart by the salt inside every block
hash; the namespace only makes their entries findable.
"""

from __future__ import annotations

import hashlib

from soberana.kv.codec import derive_key

SALT_SEPARATOR = "|"


def tenant_salt_of(cache_salt: str | None) -> str:
    """The tenant's part of a request's cache salt ("" for a request without a salt)."""
    if not cache_salt:
        return ""
    return cache_salt.split(SALT_SEPARATOR, 1)[0]


def tenant_namespace(tenant_salt: str, secret: bytes | None) -> str:
    """16 hex digits naming a tenant's entries; keyed by the shared secret when there is one,
    so that a reader of the store cannot test a guessed tenant against the keys. "" (the
    namespace of unsalted blocks) for an empty salt."""
    if not tenant_salt:
        return ""
    key = derive_key(secret, "tenant-namespace") if secret else b""
    return hashlib.blake2b(tenant_salt.encode(), key=key, digest_size=8).hexdigest()
