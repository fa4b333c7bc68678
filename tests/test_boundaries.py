"""The boundaries between services, and the typed clients' half of the wire contract.

* A module of `services/X` imports of another service `services/Y` only its
  client (`services.Y.client`, a package or a module): never its internals.
* Nothing under `shared/` imports `services`.
* Every typed client (`AuthClient`, `GatewayClient`, `MetricsClient`) names
  methods its service has, with the same idempotency and streaming, and
  parameters the handler takes.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.rpc.typed import TypedClient
from services.auth.client import AuthClient
from services.auth.service import AuthService
from services.gateway.client import GatewayClient
from services.gateway.service import GatewayService
from services.metrics.client import MetricsClient
from services.metrics.service import MetricsService

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`; `from a import b` gives a.b too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from services import auth`, `from services.auth import client`
                yield node.lineno, f"{module}.{alias.name}"


def _modules(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def _foreign(service: str, module: str) -> bool:
    """True when `module`, imported from `services/<service>`, is another service's internals."""
    parts = module.split(".")
    if parts[0] != "services" or len(parts) < 2 or parts[1] == service:
        return False
    if len(parts) == 2:  # `from services.gateway import client` yields services.gateway first
        return False
    return parts[2] != "client"


def test_services_import_only_each_others_clients() -> None:
    offences = []
    for path in _modules("services"):
        service = path.relative_to(ROOT / "services").parts[0]
        if service.endswith(".py"):
            continue  # services/__init__.py
        for line, module in _imports(path):
            if _foreign(service, module):
                offences.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offences, "services import other services' internals (use services.<name>.client):\n" + \
        "\n".join(offences)


def test_shared_imports_no_service() -> None:
    offences = [f"{path.relative_to(ROOT)}:{line}: {module}"
                for path in _modules("shared") for line, module in _imports(path)
                if module == "services" or module.startswith("services.")]
    assert not offences, "shared/ must not import services:\n" + "\n".join(offences)


def test_the_rule_itself() -> None:
    assert _foreign("web", "services.auth.tokens")
    assert _foreign("gateway", "services.inference.validation")
    assert not _foreign("web", "services.auth.client")
    assert not _foreign("web", "services.auth.client.tokens")
    assert not _foreign("web", "services.gateway.client")
    assert not _foreign("gateway", "services.gateway.relay")
    assert not _foreign("web", "shared.rpc")


def _named(func: Any) -> set[str]:
    return {p.name for p in inspect.signature(func).parameters.values() if p.kind is not p.VAR_KEYWORD}


def _takes_more(func: Any) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())


@pytest.mark.parametrize("client, service", [
    (AuthClient, AuthService), (GatewayClient, GatewayService), (MetricsClient, MetricsService),
], ids=["auth", "gateway", "metrics"])
def test_typed_client_matches_its_service(client: type[TypedClient], service: type) -> None:
    handlers = {}
    for _, func in inspect.getmembers(service, inspect.isfunction):
        spec = getattr(func, "__rpc_method__", None)
        if spec is not None:
            handlers[f"{service.name}.{spec.name or func.__name__}"] = (spec, func)
    assert client.SERVICE == service.name
    for name, wire in client.METHODS.items():
        assert wire.name in handlers, f"{client.__name__}.{name}: {wire.name} is no method of {service.__name__}"
        spec, func = handlers[wire.name]
        assert wire.idempotent == spec.idempotent, f"{wire.name}: idempotent differs from the server's"
        assert wire.stream == inspect.isasyncgenfunction(func), f"{wire.name}: streaming differs"
        method = getattr(client, name)
        sent = _named(method) - {"self", "timeout"}
        taken = _named(func) - {"self"}
        if _takes_more(func):  # the rest of gateway.infer's parameters: the generation contract's
            assert _takes_more(method), f"{client.__name__}.{name} cannot send the contract's parameters"
        assert sent <= taken, f"{client.__name__}.{name} sends parameters {wire.name} does not take: {sent - taken}"
        assert "timeout" in inspect.signature(method).parameters
