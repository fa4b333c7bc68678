"""The audit log as it is read (`auth.audit`): what may be asked, and each event as it is shown.

The SQL is in store.py (`AuthStore.audit_events`); here the filters are
checked (every refusal names its field) and each row becomes an event. Rows
hold no secrets as written (keys appear by prefix only; never a key, a hash or
a password), and `details` is redacted again here, defensively: any field
whose name looks like a secret is replaced by "[redacted]", at any depth.

A row's `actor_id` is NULL when no user acted: for the operator's changes
(`admin_granted`, `admin_revoked`, `price_set` without a token, a tier's
limits or the routing settings set with `by: "operator"`) the actor is shown as "operator"; for the
rest (a failed login) as None.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from shared.errors import InvalidParams

__all__ = ["EVENTS", "MAX_LIMIT", "DEFAULT_LIMIT", "check_actions", "check_moment", "check_limit",
           "check_before_id", "event_view", "redact"]

#: Every event the auth service writes (store.py, price_store.py, org_store.py, setting_store.py, service.py).
EVENTS = (
    "user_registered", "login_failed", "logged_out", "logged_out_everywhere", "password_changed",
    "password_change_failed", "admin_granted", "admin_revoked", "tier_changed", "user_enabled",
    "user_disabled", "key_created", "key_revoked", "key_rotated", "key_updated", "budget_changed", "price_set",
    "budget_alert", "webhook_set", "webhook_removed", "webhook_secret_rotated",
    "org_created", "org_invited", "org_joined", "org_role_changed", "org_member_removed", "org_limits_changed",
    "settings_changed",
)
#: The events whose NULL actor is the operator (a mesh member), not nobody.
_OPERATOR_EVENTS = frozenset({"admin_granted", "admin_revoked", "price_set"})
MAX_LIMIT = 500
DEFAULT_LIMIT = 100
# "token" but not a tier's `tokens_per_month` (a limit, not a secret).
_SECRET = re.compile(r"secret|password|token(?!s_per_)|hash|api_?key|^key$", re.IGNORECASE)
REDACTED = "[redacted]"


def check_actions(action: str | None) -> list[str] | None:
    """The events an `action` filter names: one event, or those starting with a prefix ("key_*")."""
    if action is None:
        return None
    if isinstance(action, str) and action.endswith("*"):
        named = [e for e in EVENTS if e.startswith(action[:-1])]
    else:
        named = [action] if action in EVENTS else []
    if not named:
        raise InvalidParams("action must be an audit event (" + ", ".join(EVENTS) +
                            ") or a prefix of one followed by * (key_*)", {"param": "action"})
    return named


def check_moment(text: str | None, param: str) -> datetime | None:
    """An ISO 8601 date or time; without an offset it is UTC."""
    if text is None:
        return None
    try:
        if not isinstance(text, str) or len(text) > 40:
            raise ValueError(text)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidParams(f"{param} must be an ISO 8601 time (2026-12-05T10:00:00Z or 2026-12-05)",
                            {"param": param}) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidParams(f"limit must be 1-{MAX_LIMIT}", {"param": "limit"})
    return limit


def check_before_id(before_id: int | None) -> int | None:
    if before_id is not None and not 0 < before_id < 2**63:
        raise InvalidParams("before_id is not a valid event id", {"param": "before_id"})
    return before_id


def redact(value: Any) -> Any:
    """`value` with every field named like a secret replaced, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def event_view(row: Any) -> dict[str, Any]:
    """One audit row as `auth.audit` answers it."""
    details = row["details"]
    if isinstance(details, str):  # jsonb arrives as text without a codec
        details = json.loads(details)
    actor = row["actor"]
    by_operator = row["event"] in _OPERATOR_EVENTS or (isinstance(details, dict) and details.get("by") == "operator")
    if actor is None and row["actor_id"] is None and by_operator:
        actor = "operator"
    return {"id": row["id"], "at": row["created_at"].isoformat(), "actor": actor, "user": row["subject"],
            "action": row["event"], "details": redact(details)}
