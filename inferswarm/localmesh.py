"""Where the CLI keeps things, and what `inferswarm up` leaves for a CLI on this machine.

Directories follow the XDG base directory spec: configuration under
`$XDG_CONFIG_HOME/inferswarm/` (default `~/.config/inferswarm/`), disposable
data under `$XDG_CACHE_HOME/inferswarm/` (default `~/.cache/inferswarm/`).

Once its bootstrap node is ready, `up` writes `mesh.json` in the config
directory:

    {"mesh_id": "<64 hex>", "bootstrap": "127.0.0.1:7400", "data_dir": "/home/me/inferswarm/.data"}

so that a CLI started from any directory knows which mesh runs here (to check
the records it finds) and where to join it. `INFERSWARM_MESH_ID` and
`INFERSWARM_BOOTSTRAP` override it (see `inferswarm/session.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from inferswarm.config import client_config
from shared.identity import write_private_file

__all__ = ["LocalMesh", "config_dir", "cache_dir", "mesh_file", "load_local_mesh", "save_local_mesh",
           "atomic_write"]


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/inferswarm` (the same rule as the credentials file)."""
    return (client_config().config_home or Path.home() / ".config") / "inferswarm"


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/inferswarm`: what may be deleted at any time."""
    return (client_config().cache_home or Path.home() / ".cache") / "inferswarm"


def mesh_file() -> Path:
    return config_dir() / "mesh.json"


#: Replace a file atomically, 0600 (one helper for every private file we write).
atomic_write = write_private_file


@dataclass(frozen=True)
class LocalMesh:
    """The mesh `inferswarm up` runs on this machine, as its CLIs need it."""

    mesh_id: str  #: hex, the mesh's public id
    bootstrap: str  #: "host:port" of its bootstrap DHT node
    data_dir: str  #: the stack's data directory (absolute)


def save_local_mesh(mesh: LocalMesh, path: Path | None = None) -> Path:
    """Write `mesh.json` atomically; returns its path."""
    path = path or mesh_file()
    atomic_write(path, json.dumps(asdict(mesh), indent=2).encode() + b"\n")
    return path


def load_local_mesh(path: Path | None = None) -> LocalMesh | None:
    """The saved mesh, or None when there is none (or it cannot be read)."""
    path = path or mesh_file()
    try:
        data = json.loads(path.read_text())
        mesh = LocalMesh(**{name: data[name] for name in LocalMesh.__dataclass_fields__})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not all(isinstance(value, str) and value for value in asdict(mesh).values()):
        return None
    return mesh
