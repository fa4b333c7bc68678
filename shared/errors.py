"""Typed errors with stable codes, shared by every layer and every service.

    MeshError (INTERNAL)                  base class; `code`, `message`, `data`
     ├── InvalidParams      INVALID_PARAMS     arguments do not fit the method
     ├── MethodNotFound     METHOD_NOT_FOUND   no such method (or not exposed)
     ├── DecodeError        DECODE_ERROR       bytes that are not a valid envelope
     ├── TooLarge           TOO_LARGE          message over the size cap
     ├── Unauthenticated    UNAUTHENTICATED    no/invalid credentials
     ├── Forbidden          FORBIDDEN          valid credentials, not allowed
     ├── NotFound           NOT_FOUND          the thing asked for does not exist
     ├── Conflict           CONFLICT           duplicate or state conflict
     ├── RateLimited        RATE_LIMITED       over a limit; data carries retry_after
     ├── Unavailable        UNAVAILABLE        no capacity / provider / connection now
     │    └── NoProviders                      a discovery lookup found nobody
     ├── Timeout            TIMEOUT            the deadline passed
     ├── Cancelled          CANCELLED          the caller cancelled
     ├── Internal           INTERNAL           a bug; details only in the server log
     └── RemoteError        (any other code)   an unknown code from a newer peer

A remote error is rebuilt on the client as the same class from its code
(`from_wire`, with `remote` set: the peer answered); unknown codes become
`RemoteError`, keeping the code. Tracebacks
never cross the wire: servers log them with the trace id and send `INTERNAL`.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "MeshError",
    "InvalidParams",
    "MethodNotFound",
    "DecodeError",
    "TooLarge",
    "Unauthenticated",
    "Forbidden",
    "NotFound",
    "Conflict",
    "RateLimited",
    "Unavailable",
    "NoProviders",
    "Timeout",
    "Cancelled",
    "Internal",
    "RemoteError",
    "from_wire",
    "ERROR_CLASSES",
]


class MeshError(Exception):
    """Base of every error that can cross the wire."""

    code: ClassVar[str] = "INTERNAL"
    #: Expected errors are logged as warnings; the others with a stack trace.
    expected: ClassVar[bool] = True

    def __init__(self, message: str = "", data: dict[str, Any] | None = None) -> None:
        super().__init__(message or self.code.lower().replace("_", " "))
        self.message = str(self.args[0])
        self.data: dict[str, Any] = dict(data or {})
        #: True when rebuilt from a peer's answer (`from_wire`): the peer was reached and
        #: said this, as opposed to a failure to reach it.
        self.remote = False

    def to_wire(self) -> tuple[str, str, dict[str, Any]]:
        return self.code, self.message, self.data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, data={self.data!r})"


class InvalidParams(MeshError):
    code = "INVALID_PARAMS"


class MethodNotFound(MeshError):
    code = "METHOD_NOT_FOUND"


class DecodeError(MeshError):
    code = "DECODE_ERROR"


class TooLarge(MeshError):
    code = "TOO_LARGE"


class Unauthenticated(MeshError):
    code = "UNAUTHENTICATED"


class Forbidden(MeshError):
    code = "FORBIDDEN"


class NotFound(MeshError):
    code = "NOT_FOUND"


class Conflict(MeshError):
    code = "CONFLICT"


class RateLimited(MeshError):
    code = "RATE_LIMITED"


class Unavailable(MeshError):
    """No capacity, provider or connection right now; worth retrying later.

    `data["delivered"]` is False when the request provably never reached a
    server, so even a non-idempotent call may be retried elsewhere.
    """

    code = "UNAVAILABLE"


class NoProviders(Unavailable):
    """A discovery lookup returned no live provider for a topic."""


class Timeout(MeshError):
    code = "TIMEOUT"


class Cancelled(MeshError):
    code = "CANCELLED"


class Internal(MeshError):
    code = "INTERNAL"
    expected = False


class RemoteError(MeshError):
    """An error whose code this version does not know; the code is kept."""

    def __init__(self, code: str, message: str = "", data: dict[str, Any] | None = None) -> None:
        super().__init__(message or code, data)
        self.remote_code = code

    def to_wire(self) -> tuple[str, str, dict[str, Any]]:
        return self.remote_code, self.message, self.data


ERROR_CLASSES: dict[str, type[MeshError]] = {
    cls.code: cls
    for cls in (
        InvalidParams,
        MethodNotFound,
        DecodeError,
        TooLarge,
        Unauthenticated,
        Forbidden,
        NotFound,
        Conflict,
        RateLimited,
        Unavailable,
        Timeout,
        Cancelled,
        Internal,
    )
}


def from_wire(code: str, message: str, data: dict[str, Any] | None) -> MeshError:
    """Rebuild the typed error for a code received from a peer."""
    cls = ERROR_CLASSES.get(code)
    error = RemoteError(code, message, data) if cls is None else cls(message, data)
    error.remote = True
    return error
