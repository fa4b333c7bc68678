"""Which methods a service exposes, and how wire parameters reach them.

A service is a plain class with a `name` and methods marked with `@method`;
nothing unmarked is callable. Parameters arrive as a map and are bound to the
handler's signature before the call: unknown or missing names, and values that
do not fit simple annotations (str, int, float, bool, bytes, list, dict,
Optional/unions, Literal), are `INVALID_PARAMS`, never a crash in the handler.
A handler written as an async generator streams: each item it yields is a chunk.
"""

from __future__ import annotations

import inspect
import time
import types
import typing
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from shared.errors import InvalidParams
from shared.roles import check_role

__all__ = [
    "method",
    "MethodSpec",
    "Handler",
    "Dispatcher",
    "RequestContext",
    "current_request",
]


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """How a handler is exposed: its wire name and its access."""

    name: str | None = None
    #: Open to any CURVE client (e.g. the gateway's); otherwise members only.
    public: bool = False
    #: Safe to run twice: the mesh client may retry it on another provider.
    idempotent: bool = False
    #: The member roles an internal method serves (shared/roles.py; the
    #: operator always); None: every member.
    roles: frozenset[str] | None = None


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


@overload
def method(fn: _Handler, *, name: str | None = None, public: bool = False, idempotent: bool = False,
           roles: Iterable[str] | None = None) -> _Handler: ...


@overload
def method(fn: None = None, *, name: str | None = None, public: bool = False, idempotent: bool = False,
           roles: Iterable[str] | None = None) -> Callable[[_Handler], _Handler]: ...


def method(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    public: bool = False,
    idempotent: bool = False,
    roles: Iterable[str] | None = None,
) -> Any:
    """Mark a service method as callable over RPC as `<service>.<name>`.

    `roles`: the member roles an internal method serves (e.g. `("gateway",)`);
    a public method serves everyone, so it takes none. It only tags the
    function; a `Dispatcher` collects the tagged methods.
    """
    allowed = None if roles is None else frozenset(check_role(role) for role in roles)
    if public and allowed is not None:
        raise TypeError("a public method serves every caller: it takes no roles")

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        func.__rpc_method__ = MethodSpec(name, public, idempotent, allowed)  # type: ignore[attr-defined]
        return func

    return mark(fn) if fn is not None else mark


@dataclass(slots=True)
class RequestContext:
    """What a handler may want to know about the call it is serving."""

    method: str
    trace_id: str
    deadline: float  #: time.monotonic() by which the caller wants the answer
    peer: str  #: the caller's CurveZMQ public key (Z85), "" when unknown
    member: bool  #: the caller holds a member credential
    #: A public caller's IP address, as its TCP connection shows it (libzmq's
    #: `Peer-Address`); "" for members and when unknown. Unlike `peer`, which
    #: the caller picks, it costs an attacker a real address.
    peer_addr: str = ""
    #: The caller's member role (shared/roles.py), "" for a public caller.
    role: str = ""

    def remaining(self) -> float:
        """Seconds left before the caller's deadline."""
        return self.deadline - time.monotonic()


#: Set for the duration of each handler call.
current_request: ContextVar[RequestContext | None] = ContextVar("current_request", default=None)


def _type_checker(annotation: Any) -> Callable[[Any], bool] | None:
    """A predicate for the simple annotations, or None to accept anything."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        checks = [_type_checker(arg) for arg in typing.get_args(annotation)]
        if any(check is None for check in checks):
            return None
        return lambda value: any(check(value) for check in checks)  # type: ignore[misc]
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        return lambda value: any(value == a and type(value) is type(a) for a in allowed)
    base = origin or annotation
    if base is type(None):
        return lambda value: value is None
    if base is bool:
        return lambda value: type(value) is bool
    if base is int:
        return lambda value: type(value) is int
    if base is float:
        return lambda value: type(value) in (float, int)
    if base in (str, bytes, dict, list):
        return lambda value: type(value) is base
    return None


class Handler:
    """One exposed method, bound to its service instance, with its binder."""

    __slots__ = ("wire_name", "spec", "func", "stream", "_names", "_required", "_checks", "_varkw")

    def __init__(self, wire_name: str, spec: MethodSpec, func: Callable[..., Any]) -> None:
        self.wire_name = wire_name
        self.spec = spec
        self.func = func
        self.stream = inspect.isasyncgenfunction(func)
        if not self.stream and not inspect.iscoroutinefunction(func):
            raise TypeError(f"{wire_name}: an RPC handler must be async (def or generator)")
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func)
        names, required, checks = set(), set(), {}
        self._varkw = False
        for param in signature.parameters.values():
            if param.kind is param.VAR_KEYWORD:
                self._varkw = True
                continue
            if param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
                raise TypeError(f"{wire_name}: parameters must be passable by name")
            names.add(param.name)
            if param.default is param.empty:
                required.add(param.name)
            check = _type_checker(hints.get(param.name, param.annotation))
            if check is not None:
                checks[param.name] = (check, hints.get(param.name, param.annotation))
        self._names, self._required, self._checks = frozenset(names), frozenset(required), checks

    def bind(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check `params` against the signature; raise `InvalidParams` on a misfit."""
        keys = params.keys()
        if self._varkw and any(type(k) is not str for k in keys):  # msgpack allows bin keys
            raise InvalidParams(f"{self.wire_name}: parameter names must be strings")
        if not self._varkw and not keys <= self._names:
            unknown = sorted(str(k) for k in keys - self._names)
            raise InvalidParams(f"{self.wire_name}: unknown parameter(s) {', '.join(unknown)}")
        if not self._required <= keys:
            missing = sorted(self._required - keys)
            raise InvalidParams(f"{self.wire_name}: missing parameter(s) {', '.join(missing)}")
        for name, (check, annotation) in self._checks.items():
            if name in params and not check(params[name]):
                expected = getattr(annotation, "__name__", None) or str(annotation)
                got = type(params[name]).__name__
                raise InvalidParams(
                    f"{self.wire_name}: parameter {name!r} must be {expected}, got {got}",
                    {"param": name},
                )
        return params

    def call(self, params: dict[str, Any]) -> Any:
        """Start the handler: a coroutine, or an async iterator when streaming."""
        return self.func(**self.bind(params))


class Dispatcher:
    """The method table of one server, built from service instances."""

    def __init__(self, *services: object) -> None:
        self._handlers: dict[str, Handler] = {}
        for service in services:
            self.add(service)

    def add(self, service: object) -> None:
        """Expose every `@method` of `service` as `<service.name>.<method>`."""
        prefix = getattr(service, "name", None)
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(f"{type(service).__name__} needs a `name` attribute")
        for attr, member in inspect.getmembers(type(service)):
            spec = getattr(member, "__rpc_method__", None)
            if not isinstance(spec, MethodSpec):
                continue
            wire_name = f"{prefix}.{spec.name or attr}"
            if wire_name in self._handlers:
                raise ValueError(f"{wire_name} is exposed twice")
            self._handlers[wire_name] = Handler(wire_name, spec, getattr(service, attr))

    def get(self, wire_name: str) -> Handler | None:
        return self._handlers.get(wire_name)

    @property
    def names(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def has_public(self) -> bool:
        return any(h.spec.public for h in self._handlers.values())

    @property
    def has_roles(self) -> bool:
        """True when some method serves only some roles."""
        return any(h.spec.roles is not None for h in self._handlers.values())

