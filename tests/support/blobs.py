"""A blob upstream the tests pace by hand, and a client that reads one
body: for fills, followers and clients that come and go."""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request


class PacedBlobs(Resource):
    """Serves blobs by digest and counts GETs. It can park requests before
    any header (``park``, answered by ``answer_parked``, with 503 when
    ``fail_parked``), stop after ``hold_at`` bytes until ``release``, or
    send corrupt bytes."""

    isLeaf = True

    def __init__(self, blobs: dict[str, bytes]) -> None:
        super().__init__()
        self.blobs = blobs
        self.gets = 0
        self.park = False
        self.fail_parked = False
        self.hold_at: int | None = None
        self.corrupt = False
        self.parked: list[Request] = []
        self.held: list[tuple[Request, bytes]] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.gets += 1
        if self.park:
            self.parked.append(request)
            return NOT_DONE_YET
        return self._answer(request)

    def _answer(self, request: Request) -> bytes | int:
        data = self.blobs[request.path.decode().rsplit("/", 1)[-1]]
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        request.setHeader(b"content-length", b"%d" % len(data))
        request.setHeader(b"content-type", b"application/octet-stream")
        if self.hold_at is None:
            return data
        request.write(data[: self.hold_at])
        self.held.append((request, data[self.hold_at :]))
        return NOT_DONE_YET

    def answer_parked(self) -> None:
        parked, self.parked, self.park = self.parked, [], False
        for request in parked:
            if request._disconnected:
                continue
            if self.fail_parked:
                request.setResponseCode(503)
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"errors":[{"code":"UNAVAILABLE","message":"down"}]}')
                request.finish()
                continue
            body = self._answer(request)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

    def release(self) -> None:
        held, self.held = self.held, []
        for request, rest in held:
            if not request._disconnected:
                request.write(rest)
                request.finish()


class Collector(Protocol):
    """Reads a response body; can hang up after the first chunk."""

    def __init__(self, hang_up: bool = False) -> None:
        self.data = b""
        self.hang_up = hang_up
        self.reason = None

    @property
    def ended(self) -> bool:
        return self.reason is not None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.hang_up:
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        self.reason = reason
