"""Where the CLI keeps what it was given: the session token and an API key.

One JSON file in the user's config directory (`$XDG_CONFIG_HOME/inferswarm/`
or `~/.config/inferswarm/`), readable by its owner only (0600). The API key
can instead come from `INFERSWARM_API_KEY`, which wins over the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from inferswarm.config import client_config
from inferswarm.localmesh import config_dir
from shared.identity import write_private_file

__all__ = ["Credentials", "credentials_path"]


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


@dataclass
class Credentials:
    """The saved login of one user of the CLI."""

    username: str | None = None
    token: str | None = None
    token_expires_at: float | None = None
    api_key: str | None = None

    def __repr__(self) -> str:  # never print the secrets
        return f"Credentials(username={self.username!r})"

    @classmethod
    def load(cls, path: Path | None = None) -> Credentials:
        path = path or credentials_path()
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            data = {}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def effective_api_key(self) -> str | None:
        """`INFERSWARM_API_KEY` if set (never written to the file), else the saved key."""
        key = client_config().api_key
        return key.reveal() if key is not None else self.api_key

    def save(self, path: Path | None = None) -> None:
        path = path or credentials_path()
        write_private_file(path, json.dumps(asdict(self), indent=2).encode())

    @staticmethod
    def forget(path: Path | None = None) -> bool:
        path = path or credentials_path()
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
