"""Which credential a process holds: its role's, or the mesh secret.

See shared/identity.py for what a credential is and shared/roles.py for what
each role may do.
"""

from __future__ import annotations

from shared.config import ConfigError, MeshConfig
from shared.identity import MemberCredential, MeshCredential

__all__ = ["mesh_credential"]


def mesh_credential(config: MeshConfig, role: str | None = None) -> MeshCredential | MemberCredential:
    """This process's credential, first found wins:

    1. a member credential, `INFERSWARM_CREDENTIAL` or the file named by
       `INFERSWARM_CREDENTIAL_FILE` -- what a service should be given; it
       must be of `role`;
    2. the mesh secret, `INFERSWARM_MESH_SECRET` or `data_dir/mesh.secret`:
       then the process derives `role`'s credential (or, with no role, acts as
       the operator). The first node of a mesh (no bootstrap seeds) creates the
       secret file; a node joining a mesh must be given a credential, never a
       fresh secret.
    """
    text = None
    if config.credential is not None:
        where, text = "INFERSWARM_CREDENTIAL", config.credential.reveal()
    elif config.credential_file is not None:
        where = f"INFERSWARM_CREDENTIAL_FILE ({config.credential_file})"
        try:
            text = config.credential_file.read_text()
        except OSError as exc:
            raise ConfigError([f"{where}: cannot read it ({exc.strerror or exc})"]) from None
    if text is not None:
        try:
            member = MemberCredential.from_text(text)
        except ValueError as exc:
            raise ConfigError([f"{where}: {exc}"]) from None
        if role is not None and member.role != role:
            raise ConfigError([f"{where}: a credential of the {member.role!r} role, and this process is {role!r}"])
        return member
    if config.mesh_secret is not None:
        mesh = MeshCredential.from_text(config.mesh_secret.reveal())
    else:
        path = config.mesh_secret_path
        if not path.exists() and config.bootstrap:
            raise ConfigError(
                [
                    "INFERSWARM_CREDENTIAL: required to join an existing mesh (make one with "
                    f"`inferswarm credential {role or 'ROLE'}` where the mesh secret is), "
                    f"or put the mesh secret in {path}"
                ]
            )
        mesh = MeshCredential.load_or_create(path)
    return mesh if role is None else mesh.member(role)
