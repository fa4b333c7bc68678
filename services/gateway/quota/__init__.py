"""A gateway's side of the fleet-wide limits (README.md, "Limits").

| module | what |
| --- | --- |
| `admission.py` | `Quota`: admission from local leases, settling, waiting for returns, the facts callers see |
| `book.py` | `LeaseBook`: the one owner of the per-key states and the open leases |
| `writer.py` | `LeaseWriter`: the one task that grants, claims and returns leases, in batches |
| `leases.py` | counters (rolling, daily, monthly; requests, tokens, money), subjects, leases, per-key state |
"""

from services.gateway.quota.admission import Admission, Quota, Scope
from services.gateway.quota.book import LeaseBook, LeaseLog
from services.gateway.quota.leases import (
    COUNTERS, MONEY_COUNTERS, TOKEN_COUNTER, money_text, money_units, subject_of,
)

__all__ = ["Admission", "COUNTERS", "LeaseBook", "LeaseLog", "MONEY_COUNTERS", "Quota", "Scope", "TOKEN_COUNTER",
           "money_text", "money_units", "subject_of"]
