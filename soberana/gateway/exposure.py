"""`--check`'s privacy audit: an `onprem` backend whose endpoint is not on a private network.

A backend declared `onprem` receives the prompts of tenants allowed only `onprem`; if its URL
points at the public internet (a cloud API pasted under the wrong class), those prompts leave
the site. The loader cannot know who operates an address, so this is a warning the operator
must look at, not a config error: a company may run its own replicas on public addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from soberana.gateway.config import GatewayConfig

_LOCAL_NAMES = ("localhost", ".localhost")


def onprem_exposures(config: GatewayConfig) -> list[str]:
    """One line per `onprem` backend whose host is not loopback or a private address."""
    found = []
    for model in config.models.values():
        for i, backend in enumerate(model.backends):
            if backend.privacy != "onprem":
                continue
            host = urlsplit(backend.endpoint).hostname or ""
            why = _public_reason(host)
            if why is not None:
                found.append(
                    f"models.{model.name}.backends[{i}] ({backend.name}): declared privacy "
                    f"onprem, but its endpoint host {host!r} {why}; onprem-only tenants' prompts "
                    "would go there (declare it `privacy: external` if a third party runs it)"
                )
    return found


def _public_reason(host: str) -> str | None:
    """Why `host` may be outside the site, or None when it is loopback or private."""
    if host == _LOCAL_NAMES[0] or host.endswith(_LOCAL_NAMES[1]):
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a DNS name: judge the addresses it resolves to here and now
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return "does not resolve here, so it cannot be shown to be private"
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
        public = sorted(str(a) for a in addresses if not _private(a))
        return f"resolves to public addresses ({', '.join(public)})" if public else None
    return None if _private(address) else "is a public address"


def _private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_private or address.is_loopback
