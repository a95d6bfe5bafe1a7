"""netback's transmit rate limit (Linux's credit scheduler) on a clock of the test's own."""

from __future__ import annotations

import pytest

from xdom.backends.netback.credit import MIN_BURST, CreditLimiter, parse_rate_node


@pytest.mark.parametrize("raw,want", [
    (b"1250000,20000", (1250000, 20000)), ("100,1", (100, 1)), (b" 7,9 ", (7, 9)),
    (None, None), (b"", None), (b"10", None), (b"10,", None), (b",10", None), (b"-1,10", None),
    (b"0,10", None), (b"10,0", None), (b"1e3,10", None), (b"10,10,10", None), (b"\xff,1", None),
    (str(1 << 64).encode() + b",1", None), (b"1," + str(1 << 32).encode(), None),
])
def test_rate_node(raw: bytes | str | None, want: tuple[int, int] | None) -> None:
    assert parse_rate_node(raw) == want


def test_a_window_of_credit_then_waiting_for_the_next() -> None:
    lim = CreditLimiter(10_000, 100_000, now=0.0)        # 10 kB per 100 ms
    assert lim.admit(6_000, 0.0) and lim.admit(4_000, 0.01)
    assert not lim.admit(1, 0.02)                         # spent: wait for the window's end
    assert lim.deadline() == pytest.approx(0.1)
    assert not lim.admit(1, 0.05)                         # still waiting: not even a byte
    assert lim.admit(1_000, 0.1)                          # the deadline brought a window's worth
    assert lim.deadline() is None
    assert lim.admit(9_000, 0.1) and not lim.admit(1, 0.1)


def test_quiet_time_buys_one_window_and_big_packets_wait_for_several() -> None:
    lim = CreditLimiter(10_000, 100_000, now=0.0)
    assert lim.admit(10_000, 0.0)
    # a long pause replenishes once, not once per window missed
    assert lim.admit(10_000, 100.0)
    assert not lim.admit(1, 100.0)
    # a 64 KiB GSO packet, bigger than a window's credit, waits while credit accumulates (up to MIN_BURST)
    now, waits = 100.0, 0
    while not lim.admit(65_535, now):
        deadline = lim.deadline()
        assert deadline is not None and deadline > now
        now, waits = deadline, waits + 1
    assert waits == 7 and lim.remaining == 70_000 - 65_535


def test_big_credit_windows_cap_at_the_credit() -> None:
    lim = CreditLimiter(1_000_000, 1_000_000, now=0.0)    # 1 MB per second
    assert lim.admit(1_000_000, 0.0) and not lim.admit(65_535, 0.5)
    assert lim.admit(65_535, 1.0)
    assert lim.remaining == 1_000_000 - 65_535            # not 2 MB: the quiet half second bought nothing


def test_admitted_bytes_never_outrun_the_rate() -> None:
    """Over any run of admissions, bytes sent <= burst + rate * elapsed, whatever the packet sizes."""
    import random
    rng = random.Random(3)
    credit, usec = 50_000, 10_000                         # 5 MB/s
    lim = CreditLimiter(credit, usec, now=0.0)
    now, sent = 0.0, 0
    for _ in range(20_000):
        size = rng.choice([60, 1514, 9000, 65_535])
        while not lim.admit(size, now):
            d = lim.deadline()
            now = d if d is not None else now + 0.001
        sent += size
        assert sent <= max(credit, MIN_BURST) + credit * (now / (usec / 1e6)) + 1
    assert sent / now > 0.9 * credit / (usec / 1e6)      # and it does not starve either
