"""Where the gateway may send a provider's secret: the one rule, used when a provider connection is
saved (gateway.services) and on every connection the gateway opens (gateway.upstream).

With GATEWAY_REFUSE_PRIVATE_PROVIDERS on (the production default), an address that is not public
is refused: private, loopback, link-local, unspecified, multicast, reserved, shared (100.64.0.0/10),
IPv6 unique-local and site-local, and IPv6 forms that carry one of these IPv4 addresses (mapped,
NAT64, 6to4). The platform's operator can allow networks anyway (self-hosted model servers) with
GATEWAY_PROVIDER_ALLOWED_NETWORKS. Settings are read on every call.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from urllib.parse import urlsplit

from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052's well-known prefix: the last 32 bits are IPv4


def refusal(address: str) -> str | None:
    """Why the gateway must not connect to this IP address, or None when it may."""
    if not settings.GATEWAY_REFUSE_PRIVATE_PROVIDERS:
        return None
    ip = ipaddress.ip_address(address)
    carried = _carried_ipv4(ip)
    kind = _internal_kind(carried or ip)
    if kind is None or _allowed(ip) or (carried is not None and _allowed(carried)):
        return None
    return f"{address} is {kind} address" + (f" (it reaches {carried})" if carried else "")


def name_refusal(host: str, addresses: list[str]) -> str | None:
    """Why a name that resolved to `addresses` must not be used, or None when at least one of them
    may (the gateway connects only to those)."""
    reasons = [refusal(address) for address in addresses]
    if not addresses or not all(reasons):
        return None
    return f"{host} resolves only to internal addresses: " + "; ".join(dict.fromkeys(reasons))


def url_refusal(url: str) -> str | None:
    """Why a provider connection must not point at this URL, or None. A name is resolved as the
    gateway resolves it; one that does not resolve now is let through, since every connection is
    checked again when it is opened."""
    if not settings.GATEWAY_REFUSE_PRIVATE_PROVIDERS:
        return None
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return refusal(host)
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return name_refusal(host, list(dict.fromkeys(str(info[4][0]) for info in found)))


def _carried_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address delivers to, for the forms that embed one."""
    if ip.version == 4:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _internal_kind(ip: IPAddress) -> str | None:
    for kind, test in (("a loopback", ip.is_loopback), ("an unspecified", ip.is_unspecified),
                       ("a link-local", ip.is_link_local), ("a multicast", ip.is_multicast),
                       ("a private", ip.is_private), ("a reserved", ip.is_reserved),
                       ("a site-local", ip.version == 6 and ip.is_site_local)):
        if test:
            return kind
    return None if ip.is_global else "a non-public"  # e.g. the shared address space 100.64.0.0/10


def _allowed(ip: IPAddress) -> bool:
    return any(ip in network for network in _networks(tuple(settings.GATEWAY_PROVIDER_ALLOWED_NETWORKS)))


@lru_cache(maxsize=8)
def _networks(values: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(value) for value in values)
