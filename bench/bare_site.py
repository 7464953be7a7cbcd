"""The ceiling for small requests: a bare Twisted TLS site that answers
every GET or HEAD with the same bytes, the same headers and the same
certificate (and mirrord's default TLS context) as the mirror's cached
manifest, with no routing, no cache, no access log and none of mirrord's
request code. What the mirror answers per second
against what this answers on the same machine in the same run is the share
of Twisted's own cost that the mirror's work adds to.

Run by ``bench/run`` as its own process::

    python bench/bare_site.py --port P --cert fullchain.pem --key privkey.pem \\
        --body manifest.json --content-type TYPE --digest sha256:...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class SameBytes(Resource):
    """Every path answers the same body; HEAD gets the headers only."""

    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes, digest: bytes) -> None:
        super().__init__()
        self._body = body
        self._headers = [
            (b"Content-Type", content_type),
            (b"Docker-Content-Digest", digest),
            (b"Docker-Distribution-Api-Version", b"registry/2.0"),
        ]

    def render_GET(self, request: Request) -> bytes:
        for name, value in self._headers:
            request.setHeader(name, value)
        return self._body

    def render_HEAD(self, request: Request) -> bytes:
        # twisted.web sends the Content-Length of the body and drops it.
        return self.render_GET(request)


class QuietSite(Site):
    """No access log: the ceiling does no per-request work of its own."""

    def log(self, request: Request) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True, help="PEM chain (fullchain.pem)")
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--content-type", default="application/vnd.oci.image.manifest.v1+json")
    parser.add_argument("--digest", default="")
    args = parser.parse_args(argv)

    from OpenSSL import SSL
    from twisted.internet import reactor, ssl

    from mirrord.config import Config
    from mirrord.daemon.tls import make_context

    # The context mirrord builds from certbot's files with its default
    # protocol floor and ciphers, so both ends negotiate the same way.
    defaults = Config()
    context = make_context(args.cert, args.key, defaults.tls_min_version, defaults.tls_ciphers)

    class Factory(ssl.ContextFactory):
        def getContext(self) -> SSL.Context:
            return context

    resource = SameBytes(args.body.read_bytes(), args.content_type.encode(), args.digest.encode())
    site = QuietSite(resource)
    site.noisy = False
    reactor.listenSSL(args.port, site, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
