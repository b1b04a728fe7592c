"""Per-tenant rate quotas: requests and tokens per minute, over a sliding minute, in this process.

Each replica counts its own traffic (a tenant spread over N replicas gets up to N times the rate); the session
quota, which must hold across replicas, lives in the store (StoreLimits.max_sessions_per_tenant).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field

from server.errors import APIError

WINDOW_S = 60.0


@dataclass
class Window:
    """(time, amount) entries of the last WINDOW_S seconds, and their sum."""
    entries: collections.deque = field(default_factory=collections.deque)
    total: int = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            self.total -= self.entries.popleft()[1]

    def wait_for(self, amount: int, limit: int, now: float) -> float:
        """Seconds until `amount` more fits under `limit` (0 if it fits now)."""
        if self.total + amount <= limit:
            return 0.0
        freed = self.total
        for at, used in self.entries:
            freed -= used
            if freed + amount <= limit:
                return at + WINDOW_S - now
        return WINDOW_S


class Quotas:
    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0, clock=time.monotonic):
        """0: no quota."""
        self.limits = {"requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute}
        self.clock = clock
        self.windows: dict[tuple[str, str], Window] = collections.defaultdict(Window)

    def admit(self, tenant: str, quota: str, amount: int = 1) -> None:
        """Count `amount` against the tenant's quota, or raise 429 with the seconds until it fits (Retry-After)
        and count nothing."""
        limit = self.limits[quota]
        if not limit:
            return
        if amount > limit:
            raise APIError(429, f"this request needs {amount} of your {limit} {quota.replace('_', ' ')}",
                           quota + "_exceeded", headers={"x-should-retry": "false"})
        now = self.clock()
        window = self.windows[tenant, quota]
        window.expire(now)
        wait = window.wait_for(amount, limit, now)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise APIError(429, f"over your quota of {limit} {quota.replace('_', ' ')}; retry in {retry} s",
                           quota + "_exceeded", headers={"Retry-After": str(retry)})
        window.entries.append((now, amount))
        window.total += amount
