"""Toxiproxy address strings: Go-style host:port splitting, listen-address resolution
and binding, and the address strings the API reports."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class AddressError(Exception):
    """Carries the message the real (Go) server would give."""


def split_host_port(address: str) -> tuple[str, str]:
    """net.SplitHostPort: "[::1]:80" -> ("::1", "80")."""
    colon = address.rfind(":")
    if colon < 0:
        raise AddressError(f"address {address}: missing port in address")
    host, port = address[:colon], address[colon + 1 :]
    if host.startswith("["):
        if not host.endswith("]"):
            raise AddressError(f"address {address}: missing ']' in address")
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"address {address}: too many colons in address")
    return host, port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_number(port: str) -> int:
    if port == "":
        return 0
    if port.isdigit():
        number = int(port)
        if number <= 65535:
            return number
        raise AddressError(f"address {port}: invalid port")
    try:
        return socket.getservbyname(port, "tcp")
    except OSError:
        raise AddressError(f"lookup tcp/{port}: unknown port") from None


async def _resolve_ip(host: str) -> str:
    """An IP for host, preferring IPv4 as Go does when it must pick one address."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(literal, ipaddress.IPv6Address) and literal.ipv4_mapped is not None:
            return str(literal.ipv4_mapped)
        return str(literal)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise AddressError(f"lookup {host}: no such host") from None
    addresses = [str(info[4][0]) for info in infos]
    ipv4 = [a for a in addresses if ":" not in a]
    return (ipv4 or addresses)[0]


async def resolve_listen(listen: str) -> str:
    """net.ResolveTCPAddr(listen).String(): hostnames become IPs, an empty host stays empty."""
    host, port = split_host_port(listen)
    number = _port_number(port)
    if host == "":
        return f":{number}"
    return join_host_port(await _resolve_ip(host), number)


async def bind(listen: str) -> tuple[socket.socket, str]:
    """A listening socket for listen and the address it is bound to, as Go reports it."""
    host, port = split_host_port(listen)
    number = _port_number(port)
    wildcard = host in WILDCARD_HOSTS
    ip = "::" if wildcard else await _resolve_ip(host)
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        if not wildcard:
            raise AddressError(
                f"listen tcp {join_host_port(ip, number)}: socket: address family not supported"
            ) from None
        # No IPv6 on this host: serve IPv4 only, still reported as the dual-stack wildcard.
        ip, family = "0.0.0.0", socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and wildcard:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((ip, number))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        raise AddressError(f"listen tcp {join_host_port(ip, number)}: bind: {reason}") from None
    bound_port = sock.getsockname()[1]
    return sock, join_host_port("::" if wildcard else ip, bound_port)


def connect_target(upstream: str) -> tuple[str, str]:
    """Host and port to dial for an upstream; an empty host means this machine, as in Go."""
    host, port = split_host_port(upstream)
    return host or "localhost", port
