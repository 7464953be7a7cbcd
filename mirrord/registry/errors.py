"""Registry errors and their JSON form, as the distribution spec defines them."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryError(Exception):
    """An error a client sees as ``{"errors":[{"code":..., "message":...}]}``."""

    status: int
    code: str
    message: str
    retry_after: int | None = None

    def to_json(self) -> bytes:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> bytes:
    """The registry's error document for one error."""
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def name_invalid(name: str) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", f"invalid repository name: {name!r}")


def digest_invalid(digest: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", f"invalid digest: {digest!r}")


def tag_invalid(tag: str) -> RegistryError:
    return RegistryError(400, "TAG_INVALID", f"invalid tag: {tag!r}")


def unsupported_method(method: str) -> RegistryError:
    return RegistryError(405, "UNSUPPORTED", f"{method} is not supported: this mirror is read-only")


def not_found(path: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", f"no registry endpoint at {path!r}")


def range_invalid(value: str) -> RegistryError:
    return RegistryError(416, "RANGE_INVALID", f"range not satisfiable: {value!r}")


def bad_gateway(message: str) -> RegistryError:
    return RegistryError(502, "UNAVAILABLE", message)


def gateway_timeout(message: str) -> RegistryError:
    return RegistryError(504, "UNAVAILABLE", message)


def rate_limited(retry_after: int) -> RegistryError:
    return RegistryError(
        429,
        "TOOMANYREQUESTS",
        "every upstream is rate-limited; retry later",
        retry_after=retry_after,
    )


def denied(message: str) -> RegistryError:
    return RegistryError(403, "DENIED", message)
