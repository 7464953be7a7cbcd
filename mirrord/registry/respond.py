"""Writing answers to clients: registry errors, small bodies, host names."""

from __future__ import annotations

import re

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.registry import errors
from mirrord.registry.errors import RegistryError

API_VERSION = (b"Docker-Distribution-Api-Version", b"registry/2.0")
_HOST_RE = re.compile(rb"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def write_error(request: Request, error: RegistryError) -> None:
    """Answer with the registry's JSON error format, if the client is still there."""
    if request.finished or request._disconnected or request.startedWriting:
        return
    body = error.to_json()
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.setHeader(*API_VERSION)
    if error.retry_after is not None:
        request.setHeader(b"Retry-After", b"%d" % error.retry_after)
    if error.status == 405:
        request.setHeader(b"Allow", b"GET, HEAD")
    request.write(body)
    request.finish()


class ReadOnlyResource(Resource):
    """A resource of GET and HEAD: any other method gets the registry's 405
    (Twisted alone answers an HTML 405, or 501 for a method it does not know)."""

    def render(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            write_error(request, errors.unsupported_method(request.method.decode("latin-1")))
            return NOT_DONE_YET
        return super().render(request)


def client_host(request: Request) -> str:
    """The host the client used, or our own address if its Host is not sane.

    ``Host`` is attacker-controlled and ends up in headers and HTML, so only
    a plain host[:port] is taken as given.
    """
    host = request.getHeader(b"host")
    if host and _HOST_RE.fullmatch(host):
        return host.decode("ascii")
    address = request.getHost()
    ip = getattr(address, "host", "localhost")
    port = getattr(address, "port", 443)
    ip = f"[{ip}]" if ":" in ip else ip
    return ip if port == 443 else f"{ip}:{port}"


def plain_address(host: str) -> str:
    """``::ffff:192.0.2.1`` (an IPv4 client on the dual-stack socket) → ``192.0.2.1``."""
    if host.startswith("::ffff:") and host.count(".") == 3:
        return host[7:]
    return host


def peer_address(request: Request) -> str:
    return plain_address(getattr(request.getClientAddress(), "host", "unknown"))


def client_address(request: Request) -> str:
    """The client's address: as the guard established it (trusted proxies
    resolved), else the peer's."""
    return getattr(request, "client_ip", None) or peer_address(request)


def abort_client(request: Request) -> None:
    """Cut the client connection so a partial body can never look complete."""
    transport = request.channel.transport if request.channel else None
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.loseConnection)()
