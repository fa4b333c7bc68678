"""The operator's way in: the mesh secret, for the commands only members may run.

`inferswarm admin grant|revoke` call internal methods (`auth.grant_admin`),
which auth serves to the operator role alone -- whose CurveZMQ key only the
mesh secret derives (`shared/identity.py`, `shared/roles.py`); `inferswarm
credential ROLE` derives a role's credential from it. Holding the secret (or
the database) is what makes someone the operator; no account, password,
address or service credential does.

Where the secret comes from, first found wins:

* `INFERSWARM_MESH_SECRET` (as the services read it);
* the `mesh.secret` of an explicitly given data directory (`--data-dir`,
  `INFERSWARM_DATA_DIR`);
* the `mesh.secret` of the stack `inferswarm up` runs on this machine (its
  data directory is recorded in `mesh.json`, see `localmesh.py`) -- readable
  by the user who runs the stack, not by every user of the machine.
"""

from __future__ import annotations

from pathlib import Path

from inferswarm.config import client_config
from inferswarm.localmesh import load_local_mesh, mesh_file
from inferswarm.session import SessionError
from shared.identity import MeshCredential

__all__ = ["NotAMember", "member_credential"]


class NotAMember(SessionError):
    """No mesh secret to be found: the command cannot call members-only methods."""


def member_credential(data_dir: Path | None, command: str = "this command") -> MeshCredential:
    """The mesh credential, or `NotAMember` saying where it was looked for."""
    secret = client_config().mesh_secret
    text = secret.reveal() if secret is not None else None
    if text:
        try:
            credential = MeshCredential.from_text(text)
        except ValueError as exc:
            raise NotAMember(f"INFERSWARM_MESH_SECRET: {exc}") from None
        return _same_mesh(credential)
    if data_dir is None:
        local = load_local_mesh()
        if local is None:
            raise NotAMember(
                f"{command} needs the mesh secret, and there is none here: set INFERSWARM_MESH_SECRET, "
                f"or pass --data-dir of the stack, or run it as the user of `inferswarm up` on this "
                f"machine (no {mesh_file()})"
            )
        data_dir = Path(local.data_dir)
    path = data_dir / "mesh.secret"
    try:
        credential = MeshCredential.from_text(path.read_text())
    except OSError as exc:
        raise NotAMember(
            f"{command} needs the mesh secret: cannot read {path} ({exc.strerror or exc}); "
            f"run it as the stack's user, or set INFERSWARM_MESH_SECRET"
        ) from None
    except ValueError as exc:
        raise NotAMember(f"{path}: {exc}") from None
    return _same_mesh(credential)


def _same_mesh(credential: MeshCredential) -> MeshCredential:
    named = client_config().mesh_id
    if named and named.strip().lower() != credential.mesh_id.hex():
        raise SessionError("INFERSWARM_MESH_ID names another mesh than the mesh secret: unset one of them")
    return credential
