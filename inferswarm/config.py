"""What the `inferswarm` command reads from its environment, in one place.

Read through `shared/config.py` like every process's configuration, each time
a command asks (`client_config()`), so a test or a script may set a variable
between two commands. Every variable is optional; the command line wins
where it has an option of its own (`--bootstrap`, `--data-dir`, `--base-url`,
`--ca-file`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import Secret, env, load

__all__ = ["ClientConfig", "client_config"]


@dataclass(frozen=True)
class ClientConfig:
    """The `inferswarm` command's environment."""

    #: host:port of any mesh node (comma-separated); the local stack's when unset.
    bootstrap: str | None = env("INFERSWARM_BOOTSTRAP", default=None)
    #: A stack's data directory (its mesh id, and for the operator its mesh.secret).
    data_dir: Path | None = env("INFERSWARM_DATA_DIR", default=None)
    #: The mesh's public id, for a CLI away from the stack's machine.
    mesh_id: str | None = env("INFERSWARM_MESH_ID", default=None)
    #: The mesh secret: the operator's commands (`admin grant`, `credential`).
    mesh_secret: Secret | None = env("INFERSWARM_MESH_SECRET", default=None)
    #: The web service to use instead of the mesh (`--base-url`): http(s)://HOST[:PORT].
    base_url: str | None = env("INFERSWARM_BASE_URL", default=None)
    #: A certificate authority (PEM) to trust for an https base URL (`--ca-file`).
    ca_file: Path | None = env("INFERSWARM_CA_FILE", default=None)
    #: An API key to use instead of the saved one.
    api_key: Secret | None = env("INFERSWARM_API_KEY", default=None)
    #: The password for `register`, `login` (instead of a prompt or stdin).
    password: Secret | None = env("INFERSWARM_PASSWORD", default=None)
    #: The PostgreSQL server `up` uses instead of the embedded one.
    database_url: Secret | None = env("DATABASE_URL", default=None)
    #: Where credentials.json and mesh.json live (XDG), and the provider cache.
    config_home: Path | None = env("XDG_CONFIG_HOME", default=None)
    cache_home: Path | None = env("XDG_CACHE_HOME", default=None)


def client_config() -> ClientConfig:
    """The environment as it is now (nothing here can be malformed: all text)."""
    return load(ClientConfig)
