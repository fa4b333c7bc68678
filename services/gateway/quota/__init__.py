"""A gateway's side of the fleet-wide limits (README.md, "Limits").

| module | what |
| --- | --- |
| `admission.py` | `Quota`: admission from local leases, settling, waiting for returns, the facts callers see |
| `book.py` | `LeaseBook`: the one owner of the per-key states and the open leases |
| `writer.py` | `LeaseWriter`: the one task that grants, claims and returns leases, in batches |
| `leases.py` | counters, UTC windows, leases, per-key state |
"""

from services.gateway.quota.admission import Admission, Quota
from services.gateway.quota.book import LeaseBook, LeaseLog
from services.gateway.quota.leases import TOKEN_COUNTER

__all__ = ["Admission", "LeaseBook", "LeaseLog", "Quota", "TOKEN_COUNTER"]
