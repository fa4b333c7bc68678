"""Everything other services may use of auth: nothing else under services/auth is theirs.

* `AuthClient` (api.py, and orgs.py for organisations): the `auth.*` RPC
  methods as typed calls, with the wire shapes of their answers (`TypedDict`s);
* `KeyValidator` (validator.py): validates API keys through auth, caching
  answers and evicting them within a second of a revocation (gateways);
* `TokenVerifier`, `MAX_TOKEN_LENGTH` (tokens.py): verifies session tokens
  locally with auth's public key (`AuthClient.token_key()`);
* `Alert`, `Webhook` and the rest of alerts.py: the shapes of the spending
  alerts' and webhooks' answers (`AuthClient.set_webhook`, `alerts`, ...);
* `DeadLetter`, `describe_chain` (dead_letters.py): the dead letters' shape
  (`AuthClient.dead_letters`), and a chain of attempts as people read it;
* `LIMIT_NAMES` and the rest of limits.py: the names of a scope's limits
  (README.md, "Per-key limits and budgets"), and `describe_limits`.

The tier table is a contract of its own, in shared/tiers.py.
"""

from typing import Any

from services.auth.client.api import (
    KEEP,
    Account,
    AccountCreated,
    ActiveUsers,
    AdminChange,
    ApiKey,
    AuthClient,
    Budget,
    Invalidation,
    Invalidations,
    KeyIdentity,
    Limits,
    LoggedOut,
    NewApiKey,
    Price,
    PriceTable,
    RecentRequest,
    RecordCounts,
    Report,
    ReportRow,
    ReportTotals,
    RotatedApiKey,
    RoutingSettings,
    Scope,
    Session,
    Settings,
    SettingsTable,
    Spender,
    TierInfo,
    TierLimits,
    TokenKey,
    TopSpenders,
    TriedModel,
    UsageCost,
    UsageDay,
    UsageRecord,
    UsageReport,
    UsageTotals,
    User,
)
from services.auth.client.alerts import Alert, AlertList, Webhook, WebhookAttempt, WebhookLog, WebhookWithSecret
from services.auth.client.dead_letters import DeadLetter, DeadLetterPage, describe_chain
from services.auth.client.limits import BUDGET_NAMES, COUNT_NAMES, LIMIT_NAMES, describe_limits
from services.auth.client.orgs import Invite, Member, Org, OrgDetail, OrgListed, OrgReport
from services.auth.client.validator import KeyValidator

#: Imported when first used: PyJWT and its cryptography cost a command-line
#: client ~45 ms and 10 MB it does not need (the CLI never verifies a token).
_FROM_TOKENS = frozenset({"ALGORITHM", "MAX_TOKEN_LENGTH", "TokenVerifier"})


def __getattr__(name: str) -> Any:
    if name in _FROM_TOKENS:
        from services.auth.client import tokens

        return getattr(tokens, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KEEP", "ALGORITHM", "BUDGET_NAMES", "COUNT_NAMES", "LIMIT_NAMES", "MAX_TOKEN_LENGTH", "Account", "AccountCreated",
    "ActiveUsers", "AdminChange", "ApiKey", "AuthClient", "Budget", "Invalidation", "Invalidations", "KeyIdentity",
    "KeyValidator", "Limits", "LoggedOut", "NewApiKey", "Price", "PriceTable", "RecentRequest", "RecordCounts", "Report",
    "ReportRow", "ReportTotals", "RotatedApiKey", "RoutingSettings", "Scope", "Session", "Settings", "SettingsTable", "Spender", "TierInfo", "TierLimits", "TokenKey",
    "TokenVerifier", "TopSpenders", "UsageCost", "UsageDay", "UsageRecord", "UsageReport", "UsageTotals", "User",
    "describe_limits", "Alert", "AlertList", "Webhook", "WebhookAttempt", "WebhookLog", "WebhookWithSecret",
    "Invite", "Member", "Org", "OrgDetail", "OrgListed", "OrgReport", "DeadLetter", "DeadLetterPage", "TriedModel",
    "describe_chain",
]
