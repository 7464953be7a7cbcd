"""Telling systemd how we are (``Type=notify``): ``READY=1`` once listening,
``RELOADING=1``/``READY=1`` around a reload, ``STOPPING=1`` when stopping.
One datagram to ``$NOTIFY_SOCKET``; nothing happens outside systemd."""

from __future__ import annotations

import os
import socket


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` to the service manager; ``False`` if there is none."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "@/":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True
