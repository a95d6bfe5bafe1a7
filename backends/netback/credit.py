"""A vif's transmit rate limit: Linux netback's credit scheduler, sans-IO.

xl's ``rate=10Mb/s@20ms`` reaches netback as the backend node ``rate =
"BYTES,USECS"``: every ``USECS`` microseconds the guest may send ``BYTES``
more.  As in Linux (``tx_credit_exceeded``, ``tx_add_credit``): credit is
replenished when a window has passed, capped so a quiet guest saves up at
most one window's worth (or 128 KiB, whichever is more, so one maximal
packet always fits); a packet bigger than what is left waits for the next
window, and while it waits the vif's transmit ring is not read at all.
The clock is the caller's: ``now`` in seconds (``time.monotonic()``).
"""

from __future__ import annotations

__all__ = ["CreditLimiter", "parse_rate_node"]

MIN_BURST = 131072            # Linux: max_burst is at least this, so a 64 KiB GSO packet always fits


def parse_rate_node(value: bytes | str | None) -> tuple[int, int] | None:
    """``"BYTES,USECS"`` as libxl writes it; None when absent, malformed or zero (no limit, as Linux)."""
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    b, sep, u = text.strip().partition(",")
    if not sep or not b.isdigit() or not u.isdigit():
        return None
    nbytes, usecs = int(b), int(u)
    if nbytes == 0 or usecs == 0 or nbytes >= 1 << 64 or usecs >= 1 << 32:
        return None
    return nbytes, usecs


class CreditLimiter:
    def __init__(self, credit_bytes: int, credit_usec: int, now: float) -> None:
        self.credit_bytes = credit_bytes
        self.window = credit_usec / 1e6
        self.window_start = now
        self.remaining = credit_bytes
        self.waiting_until: float | None = None

    def _add_credit(self) -> None:
        max_burst = max(MIN_BURST, self.credit_bytes)
        self.remaining = min(self.remaining + self.credit_bytes, max_burst)

    def admit(self, size: int, now: float) -> bool:
        """Whether a packet of ``size`` bytes may go now; if so, its size is charged."""
        if self.waiting_until is not None:
            if now < self.waiting_until:
                return False
            self.waiting_until = None
            self._add_credit()
        elif now >= self.window_start + self.window:
            self.window_start = now
            self._add_credit()
        if size > self.remaining:
            next_credit = self.window_start + self.window
            self.window_start = next_credit
            self.waiting_until = next_credit
            return False
        self.remaining -= size
        return True

    def deadline(self) -> float | None:
        """When a packet that was refused may be looked at again; None when nothing waits."""
        return self.waiting_until
