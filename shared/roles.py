"""Member roles: what each kind of process may announce and call.

A mesh member holds the credential of one role (see identity.py): a process
of the inference service holds the `inference` credential, and nothing in
it lets that process pass for another role. Two rules follow from a role:

* **What it may announce.** A DHT record carries its signer's role, and
  records are accepted (by storing nodes and by every looking-up client) only
  on the topics of that role: `inferswarm/<service>/...` for the service's
  own role, `inferswarm/model/...` for `inference`. A topic of an unknown
  `inferswarm/` name is nobody's; topics outside `inferswarm/` (tests, tools)
  are any member's.
* **What it may call.** An internal method names the roles it serves
  (`@method(roles=...)`, shared/rpc/dispatcher.py); other members get
  `FORBIDDEN`. Methods that name none (e.g. `rpc.ping`, `metrics.record`)
  are every member's.

`operator` is the role of whoever holds the mesh secret itself (the `up`
command, `inferswarm admin`): the secret can make every role's credential,
so the operator is allowed everything, and no service process needs it.
"""

from __future__ import annotations

__all__ = [
    "OPERATOR",
    "ROLES",
    "SERVICE_ROLES",
    "may_announce",
    "may_call",
    "check_role",
]

OPERATOR = "operator"
#: Roles of processes that announce a service topic `inferswarm/<role>/v1`.
SERVICE_ROLES = ("auth", "gateway", "inference", "metrics", "web")
#: Every role, in the order credentials are made. `dht`: a bootstrap node.
ROLES = (*SERVICE_ROLES, "dht", OPERATOR)

_PREFIX = "inferswarm/"
_MODELS = "inferswarm/model/"


def check_role(role: str) -> str:
    """`role`, or ValueError naming the roles there are."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return role


def may_announce(role: str, topic: str) -> bool:
    """True when a member of `role` may publish records on `topic`."""
    if role == OPERATOR or not topic.startswith(_PREFIX):
        return True
    if topic.startswith(_MODELS):
        return role == "inference"
    name = topic[len(_PREFIX):].split("/", 1)[0]
    return name == role and name in SERVICE_ROLES


def may_call(role: str, allowed: frozenset[str] | None) -> bool:
    """True when a member of `role` may call a method open to `allowed` roles
    (None: every member)."""
    return allowed is None or role == OPERATOR or role in allowed
