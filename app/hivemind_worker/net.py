"""Address helpers shared by the engine and the pool: which addresses are loopback."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """True for 'localhost', 127.x.y.z and ::1 (brackets allowed)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(address: str) -> bool:
    """True for 'localhost:P', '127.x.y.z:P' and '[::1]:P'."""
    return is_loopback_host(address.rpartition(":")[0] if ":" in address else address)
