"""Everything other services may use of auth: nothing else under services/auth is theirs.

* `AuthClient` (api.py): the `auth.*` RPC methods as typed calls, with the
  wire shapes of their answers (`TypedDict`s);
* `KeyValidator` (validator.py): validates API keys through auth, caching
  answers and evicting them within a second of a revocation (gateways);
* `TokenVerifier`, `MAX_TOKEN_LENGTH` (tokens.py): verifies session tokens
  locally with auth's public key (`AuthClient.token_key()`).

The tier table is a contract of its own, in shared/tiers.py.
"""

from services.auth.client.api import (
    Account,
    AccountCreated,
    ActiveUsers,
    AdminChange,
    ApiKey,
    AuthClient,
    Invalidation,
    Invalidations,
    KeyIdentity,
    LoggedOut,
    NewApiKey,
    RecentRequest,
    RecordCounts,
    Session,
    TierLimits,
    TokenKey,
    UsageDay,
    UsageRecord,
    UsageReport,
    UsageTotals,
    User,
)
from services.auth.client.tokens import ALGORITHM, MAX_TOKEN_LENGTH, TokenVerifier
from services.auth.client.validator import KeyValidator

__all__ = [
    "ALGORITHM", "MAX_TOKEN_LENGTH", "Account", "AccountCreated", "ActiveUsers", "AdminChange", "ApiKey",
    "AuthClient", "Invalidation", "Invalidations", "KeyIdentity", "KeyValidator", "LoggedOut", "NewApiKey",
    "RecentRequest", "RecordCounts", "Session", "TierLimits", "TokenKey", "TokenVerifier", "UsageDay",
    "UsageRecord", "UsageReport", "UsageTotals", "User",
]
