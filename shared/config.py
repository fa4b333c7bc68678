"""Configuration from the environment, parsed once into a frozen dataclass.

A service declares what it reads, each field naming its variable::

    @dataclass(frozen=True)
    class AuthConfig:
        mesh: MeshConfig                      # nested: read from the same environment
        token_ttl: float = env("INFERSWARM_TOKEN_TTL", default=900.0)
        jwt_key: Secret = env("INFERSWARM_JWT_KEY")          # required

    config = load(AuthConfig)   # at start; raises ConfigError naming every problem

The field's type says how the text is parsed: `str`, `int`, `float`, `bool`
(1/true/yes/on, 0/false/no/off), `Path`, `Secret`, `Literal[...]` choices,
`tuple[T, ...]` from a comma-separated list, and `T | None` for optional values.
`parse=` overrides that with any `str -> value` function raising `ValueError`.
An empty variable counts as unset, as `FOO=` in a compose file means.

`Secret` keeps a value out of reprs, logs and `describe()`; a secret's text is
never echoed in an error either.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "ConfigError",
    "Secret",
    "env",
    "load",
    "load_or_exit",
    "describe",
    "parse_bool",
    "port",
    "positive",
    "host_ports",
    "MeshConfig",
]

T = TypeVar("T")
_MASK = "***"


class ConfigError(ValueError):
    """The environment does not describe a valid configuration.

    `problems` holds one line per bad variable, e.g.
    ``"INFERSWARM_RPC_PORT: expected an integer, got 'abc'"``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class Secret:
    """A string that prints as `***`; `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return _MASK

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # Constant time, so comparing against a guess leaks nothing through timing.
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


def env(
    name: str,
    *,
    default: Any = dataclasses.MISSING,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field read from the environment variable `name`.

    Without `default` the variable is required. Fields are keyword-only, so
    required and optional ones can be declared in any order.
    """
    return dataclasses.field(
        default=default, kw_only=True, metadata={"env": name, "parse": parse}
    )


# --- parsers: each takes the raw text and raises ValueError(reason) --------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off, in any case."""
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected a boolean (1/true/yes/on or 0/false/no/off), got {raw!r}")


def _parse_int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None


def _parse_float(raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None


def port(raw: str) -> int:
    """A TCP/UDP port, 0 meaning "any free port"."""
    value = _parse_int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port between 0 and 65535, got {raw!r}")
    return value


def positive(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap a number parser so that zero and negative values are refused."""

    def parse_positive(raw: str) -> T:
        value = parse(raw)
        if not value > 0:  # type: ignore[operator]
            raise ValueError(f"expected a positive number, got {raw!r}")
        return value

    return parse_positive


def host_ports(raw: str) -> tuple[str, ...]:
    """A comma-separated list of `host:port` (IPv6 as `[::1]:port`)."""
    seeds = _split(raw)
    for seed in seeds:
        host, sep, number = seed.rpartition(":")
        if not sep or not host or not number.isdigit() or not 0 < int(number) <= 65535:
            raise ValueError(f"expected host:port items, got {seed!r}")
    return seeds


def _split(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _literal(choices: tuple[Any, ...]) -> Callable[[str], Any]:
    def parse_choice(raw: str) -> Any:
        for choice in choices:
            if str(choice).lower() == raw.strip().lower():
                return choice
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"expected one of {allowed}, got {raw!r}")

    return parse_choice


def _tuple_of(item: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    return lambda raw: tuple(item(part) for part in _split(raw))


_SIMPLE: dict[Any, Callable[[str], Any]] = {
    str: str,
    int: _parse_int,
    float: _parse_float,
    bool: parse_bool,
    Path: lambda raw: Path(raw).expanduser(),
    Secret: Secret,
}


def _parser_for(tp: Any) -> Callable[[str], Any]:
    """How to parse text into the annotated type `tp` (its `| None` removed)."""
    if tp in _SIMPLE:
        return _SIMPLE[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _literal(args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _tuple_of(_parser_for(args[0]))
    raise TypeError(f"no parser for {tp!r}; pass parse= to env()")


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


# --- loading -----------------------------------------------------------------


def load(cls: type[T], environ: Mapping[str, str] = os.environ) -> T:
    """Build the frozen config `cls` from `environ`.

    Raises `ConfigError` listing every missing or invalid variable at once, so
    a misconfigured deployment is fixed in one round, not one error at a time.
    """
    problems: list[str] = []
    config: T = _load(cls, environ, problems)
    if problems:
        raise ConfigError(problems)
    return config


def _load(cls: type[Any], environ: Mapping[str, str], problems: list[str]) -> Any:
    """`cls` built from `environ`, or None when `problems` were found."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for fld in dataclasses.fields(cls):
        tp = _strip_optional(hints[fld.name])
        if "env" in fld.metadata:
            value = _read(fld, tp, environ, problems)
            if value is not dataclasses.MISSING:
                values[fld.name] = value
        elif dataclasses.is_dataclass(tp):
            values[fld.name] = _load(typing.cast(type[Any], tp), environ, problems)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{fld.name} names no environment variable")
    return None if problems else cls(**values)


def _read(
    fld: dataclasses.Field[Any], tp: Any, environ: Mapping[str, str], problems: list[str]
) -> Any:
    """The parsed value of one field, MISSING to keep its default."""
    name: str = fld.metadata["env"]
    raw = environ.get(name, "")
    if raw == "":
        if fld.default is dataclasses.MISSING:
            problems.append(f"{name}: required but not set")
        return dataclasses.MISSING
    parse = fld.metadata["parse"] or _parser_for(tp)
    try:
        return parse(raw)
    except ValueError as exc:
        reason = str(exc) or "invalid value"
        if tp is Secret:  # a parser's message may quote the value: hide it
            reason = reason.replace(repr(raw), _MASK).replace(raw, _MASK)
        problems.append(f"{name}: {reason}")
        return dataclasses.MISSING


def load_or_exit(cls: type[T], service: str, environ: Mapping[str, str] = os.environ) -> T:
    """`load` for a process's `main`: on a bad environment, print every problem
    (one line each, naming the variable) and exit with status 2."""
    try:
        return load(cls, environ)
    except ConfigError as exc:
        print(f"{service}: configuration error:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        raise SystemExit(2) from None


def describe(config: Any) -> dict[str, Any]:
    """The config as a plain dict that is safe to log: secrets masked."""
    return {
        fld.name: _describe_value(getattr(config, fld.name))
        for fld in dataclasses.fields(config)
    }


def _describe_value(value: Any) -> Any:
    if isinstance(value, Secret):
        return _MASK
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return describe(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_describe_value(item) for item in value]
    return value


# --- the part of the configuration every process shares ------------------------

LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*", ""})


@dataclass(frozen=True)
class MeshConfig:
    """Where a process keeps its state, how it joins the mesh, how it logs."""

    data_dir: Path = env("INFERSWARM_DATA_DIR", default=Path(".data"))
    #: This process's name in the data directory (its key lives under
    #: `data_dir/nodes/<name>/`); None means the service name.
    node_name: str | None = env("INFERSWARM_NODE_NAME", default=None)
    bootstrap: tuple[str, ...] = env("INFERSWARM_BOOTSTRAP", default=(), parse=host_ports)
    dht_host: str = env("INFERSWARM_DHT_HOST", default="127.0.0.1")
    dht_port: int = env("INFERSWARM_DHT_PORT", default=0, parse=port)
    rpc_host: str = env("INFERSWARM_RPC_HOST", default="127.0.0.1")
    rpc_port: int = env("INFERSWARM_RPC_PORT", default=0, parse=port)
    #: The host put in announced endpoints; None means `rpc_host`.
    advertise_host: str | None = env("INFERSWARM_ADVERTISE_HOST", default=None)
    #: This process's member credential (`inferswarm credential ROLE`), as
    #: text or in a file; it wins over the mesh secret (shared/identity.py).
    credential: Secret | None = env("INFERSWARM_CREDENTIAL", default=None)
    credential_file: Path | None = env("INFERSWARM_CREDENTIAL_FILE", default=None)
    #: The mesh secret itself (the operator's: every role's credential derives
    #: from it). None means "read (or create) `data_dir/mesh.secret`".
    mesh_secret: Secret | None = env("INFERSWARM_MESH_SECRET", default=None)
    record_ttl: float = env("INFERSWARM_RECORD_TTL", default=30.0, parse=positive(_parse_float))
    log_level: LogLevel = env("INFERSWARM_LOG_LEVEL", default="info")
    log_format: LogFormat = env("INFERSWARM_LOG_FORMAT", default="json")
    max_message_bytes: int = env(
        "INFERSWARM_MAX_MESSAGE_BYTES", default=1_048_576, parse=positive(_parse_int)
    )
    # What callers may cost this process's RPC server (shared/rpc/PROTOCOL.md, Limits).
    rpc_max_depth: int = env("INFERSWARM_RPC_MAX_DEPTH", default=32, parse=positive(_parse_int))
    rpc_public_max_items: int = env(
        "INFERSWARM_RPC_PUBLIC_MAX_ITEMS", default=16_384, parse=positive(_parse_int)
    )
    rpc_max_in_flight: int = env(
        "INFERSWARM_RPC_MAX_IN_FLIGHT", default=4096, parse=positive(_parse_int)
    )
    rpc_public_max_in_flight: int = env(
        "INFERSWARM_RPC_PUBLIC_MAX_IN_FLIGHT", default=1024, parse=positive(_parse_int)
    )
    rpc_peer_max_in_flight: int = env(
        "INFERSWARM_RPC_PEER_MAX_IN_FLIGHT", default=32, parse=positive(_parse_int)
    )
    rpc_public_max_timeout: float = env(
        "INFERSWARM_RPC_PUBLIC_MAX_TIMEOUT", default=300.0, parse=positive(_parse_float)
    )
    rpc_stall_timeout: float = env(
        "INFERSWARM_RPC_STALL_TIMEOUT", default=30.0, parse=positive(_parse_float)
    )
    # Traces (shared/tracing.py): the standard OpenTelemetry variables. A base
    # URL gets the OTLP/HTTP path /v1/traces; the traces endpoint is used as is.
    otlp_endpoint: str | None = env("OTEL_EXPORTER_OTLP_ENDPOINT", default=None)
    otlp_traces_endpoint: str | None = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", default=None)
    otel_sdk_disabled: bool = env("OTEL_SDK_DISABLED", default=False)

    def __post_init__(self) -> None:
        # A wildcard bind address is no address a peer can dial: announcing
        # tcp://0.0.0.0:port would publish an endpoint nobody can reach.
        if self.advertise_host is None and self.rpc_host in _WILDCARD_HOSTS:
            raise ConfigError(
                [
                    f"INFERSWARM_ADVERTISE_HOST: required when INFERSWARM_RPC_HOST "
                    f"is the wildcard {self.rpc_host!r}"
                ]
            )

    @property
    def advertised_host(self) -> str:
        """The host other nodes dial to reach this one's RPC socket."""
        return self.advertise_host or self.rpc_host

    @property
    def traces_endpoint(self) -> str | None:
        """Where spans are sent (OTLP/HTTP), or None: tracing off."""
        if self.otel_sdk_disabled:
            return None
        if self.otlp_traces_endpoint:
            return self.otlp_traces_endpoint
        if self.otlp_endpoint:
            return self.otlp_endpoint.rstrip("/") + "/v1/traces"
        return None

    @property
    def mesh_secret_path(self) -> Path:
        """Where the mesh secret is kept when INFERSWARM_MESH_SECRET is unset."""
        return self.data_dir / "mesh.secret"
