"""`soberana kv`: operations on the KV warehouse's shared tiers."""

from __future__ import annotations

import argparse
import sys

from soberana.config_flags import add_flags, from_flags
from soberana.kv.config import FLAG_PREFIX, KVWarehouseConfig
from soberana.kv.namespace import tenant_namespace, tenant_salt_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`soberana kv purge ...`."""
    sub = parser.add_subparsers(dest="kv_command", metavar="ACTION", required=True)
    purge = sub.add_parser(
        "purge",
        help="delete one tenant's KV entries from the shared tiers",
        description="Delete every KV entry of one tenant from Redis and the shared directory "
        "(every model and layout). Replicas' host RAM and local disk tiers are not reached: "
        "they empty as they evict, or at a restart with an empty --kv-disk-dir.",
    )
    who = purge.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--tenant",
        help="the tenant as the server names it (e.g. `key:...` for an API key); its salt "
        "is derived by the server's own function (soberana.server.tenancy)",
    )
    who.add_argument(
        "--salt",
        help="the tenant's part of the cache salt (before the first '|'), for salts the "
        "server did not derive (a gateway's, a client's own)",
    )
    purge.add_argument(
        "--tenant-salt-secret-file",
        default=None,
        help="the server's salt secret, where the server derives tenant salts with one",
    )
    # The replicas' own flags (their --kv-redis-url, ...): tenant namespaces are keyed.
    add_flags(purge, KVWarehouseConfig, prefix=FLAG_PREFIX,
              only=("redis_url", "shared_dir", "shared_key_file", "shared_trusted"))


def run(args: argparse.Namespace) -> int:
    config = from_flags(KVWarehouseConfig, args, prefix=FLAG_PREFIX)
    if not config.has_shared_tier():
        print("soberana kv purge: give --kv-redis-url and/or --kv-shared-dir", file=sys.stderr)
        return 2
    try:
        config.validate()
    except ValueError as e:
        print(f"soberana kv purge: {e}", file=sys.stderr)
        return 2
    salt = args.salt if args.tenant is None else _server_tenant_salt(args)
    namespace = tenant_namespace(tenant_salt_of(salt), config.shared_key())
    if not namespace:
        print("soberana kv purge: the tenant's salt is empty", file=sys.stderr)
        return 2
    from soberana.kv.purge import purge_tenant

    removed = purge_tenant(namespace, config.redis_url, config.shared_dir)
    for tier, count in removed.items():
        print(f"{tier}: removed {count} entries of tenant namespace {namespace}")
    return 0


def _server_tenant_salt(args: argparse.Namespace) -> str:
    """The salt the server gives the tenant's requests, computed by the server's own
    function (so a change of derivation there is followed here)."""
    from soberana.server.tenancy import effective_cache_salt

    state: dict = {"tenant": args.tenant}
    if args.tenant_salt_secret_file:
        with open(args.tenant_salt_secret_file, "rb") as f:
            state["salt_secret"] = f.read().strip()
    return effective_cache_salt({"state": state}, None) or ""
