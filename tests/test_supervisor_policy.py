"""The supervisor's pure parts: restart policy, backoff, flap limit, health limits, control protocol, layout.

No process is started here: every rule is checked on the state machines
themselves, with the clock passed in.
"""

from __future__ import annotations

import os
import signal

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.deploy.control import ControlError, ControlProtocol, string_field
from xdom.deploy.policy import (
    CPU_WINDOW,
    MAX_BACKOFF,
    Action,
    ExitStatus,
    HealthCheck,
    HealthSample,
    RestartTracker,
)
from xdom.deploy.rundir import Layout, LayoutError, PidFile, running_pid, topology_name
from xdom.deploy.topology import Limits, RestartPolicy

CLEAN, FAIL, KILL = ExitStatus(code=0), ExitStatus(code=1), ExitStatus(signal=signal.SIGKILL)


def tracker(policy: str = "always", backoff: float = 0.5, limit: int = 5, window: float = 60.0) -> RestartTracker:
    return RestartTracker(RestartPolicy(policy), backoff, limit, window)


# ---- exit statuses ---------------------------------------------------------------

def test_exit_status_from_returncode_and_description() -> None:
    assert ExitStatus.from_returncode(0) == CLEAN and CLEAN.clean
    assert ExitStatus.from_returncode(3) == ExitStatus(code=3) and not ExitStatus(code=3).clean
    assert ExitStatus.from_returncode(-9) == KILL and not KILL.clean
    assert FAIL.describe() == "exited with status 1"
    assert KILL.describe() == "killed by SIGKILL"
    assert ExitStatus(signal=200).describe() == "killed by signal 200"
    with pytest.raises(ValueError):
        ExitStatus()
    with pytest.raises(ValueError):
        ExitStatus(code=0, signal=9)


# ---- restart policies ----------------------------------------------------------------

@pytest.mark.parametrize("policy, status, action", [
    ("never", CLEAN, Action.STAY_DOWN), ("never", FAIL, Action.STAY_DOWN), ("never", KILL, Action.STAY_DOWN),
    ("on-failure", CLEAN, Action.STAY_DOWN), ("on-failure", FAIL, Action.RESTART), ("on-failure", KILL, Action.RESTART),
    ("always", CLEAN, Action.RESTART), ("always", FAIL, Action.RESTART), ("always", KILL, Action.RESTART),
])
def test_each_policy_against_each_kind_of_exit(policy: str, status: ExitStatus, action: Action) -> None:
    decision = tracker(policy).on_exit(status, now=100.0)
    assert decision.action == action
    assert decision.reason


def test_backoff_doubles_and_is_capped() -> None:
    t = tracker(backoff=0.5, limit=100, window=1000.0)
    delays = [t.on_exit(FAIL, now=float(i)).delay for i in range(10)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]


def test_backoff_starts_again_once_restarts_leave_the_window() -> None:
    t = tracker(backoff=1.0, limit=100, window=10.0)
    assert [t.on_exit(FAIL, now=n).delay for n in (0.0, 1.0, 2.0)] == [0.0, 1.0, 2.0]
    assert t.on_exit(FAIL, now=11.5).delay == 1.0      # 0 and 1 left the window; 2 remains
    assert t.recent(11.5) == 2                          # 2 and 11.5
    assert t.on_exit(FAIL, now=30.0).delay == 0.0      # a quiet spell: back at once


def test_zero_backoff_restarts_at_once() -> None:
    t = tracker(backoff=0.0, limit=3)
    assert [t.on_exit(KILL, now=float(i)).delay for i in range(3)] == [0.0, 0.0, 0.0]


def test_flap_limit_gives_up_and_manual_reset_clears_it() -> None:
    t = tracker(limit=3, window=60.0)
    assert [t.on_exit(FAIL, now=n).action for n in (0.0, 1.0, 2.0)] == [Action.RESTART] * 3
    gave_up = t.on_exit(FAIL, now=3.0)
    assert gave_up.action == Action.GIVE_UP
    assert "3 restarts within 60s" in gave_up.reason and "giving up" in gave_up.reason
    t.reset()                                           # xdom restart
    assert t.on_exit(FAIL, now=4.0).action == Action.RESTART


def test_flap_window_slides() -> None:
    t = tracker(limit=2, window=10.0)
    assert t.on_exit(FAIL, now=0.0).action == Action.RESTART
    assert t.on_exit(FAIL, now=5.0).action == Action.RESTART
    assert t.on_exit(FAIL, now=9.0).action == Action.GIVE_UP
    assert t.on_exit(FAIL, now=10.5).action == Action.RESTART     # 0.0 has left the window


def test_clean_exits_under_on_failure_do_not_count_towards_flapping() -> None:
    t = tracker("on-failure", limit=1)
    for n in range(5):
        assert t.on_exit(CLEAN, now=float(n)).action == Action.STAY_DOWN
    assert t.on_exit(FAIL, now=6.0).action == Action.RESTART


def test_tracker_refuses_nonsense() -> None:
    for args in ((-1.0, 5, 60.0), (0.5, 0, 60.0), (0.5, 5, 0.0)):
        with pytest.raises(ValueError):
            RestartTracker(RestartPolicy.ALWAYS, *args)


@settings(max_examples=200, deadline=None)
@given(policy=st.sampled_from(list(RestartPolicy)), backoff=st.floats(0, 100), limit=st.integers(1, 8),
       window=st.floats(0.1, 1000), exits=st.lists(st.tuples(st.floats(0, 50), st.sampled_from([CLEAN, FAIL, KILL])),
                                                  max_size=40))
def test_decisions_are_always_legal(policy: RestartPolicy, backoff: float, limit: int, window: float,
                                    exits: list[tuple[float, ExitStatus]]) -> None:
    """Whatever happens: delays within [0, cap]; restart only when the policy allows it and the domain
    is not flapping; giving up only when flap_limit restarts happened within the window."""
    t = RestartTracker(policy, backoff, limit, window)
    now, restarts = 0.0, []
    for gap, status in exits:
        now += gap
        d = t.on_exit(status, now)
        recent = [r for r in restarts if now - r < window]
        wanted = policy == RestartPolicy.ALWAYS or (policy == RestartPolicy.ON_FAILURE and not status.clean)
        assert 0.0 <= d.delay <= MAX_BACKOFF
        if not wanted:
            assert d.action == Action.STAY_DOWN
        elif len(recent) >= limit:
            assert d.action == Action.GIVE_UP
        else:
            assert d.action == Action.RESTART
            assert d.delay == (0.0 if not recent else min(MAX_BACKOFF, backoff * 2 ** (len(recent) - 1)))
            restarts.append(now)


# ---- health limits -----------------------------------------------------------------

def test_rss_and_fds_limits_trip_at_once() -> None:
    h = HealthCheck(Limits(rss_bytes=64 << 20, fds=32))
    assert h.check(HealthSample(rss=64 << 20, fds=32, cpu_percent=0.0)) is None
    assert h.check(HealthSample(rss=(64 << 20) + 1, fds=1, cpu_percent=0.0)) == \
        "rss 64.0 MiB is over its limit of 64.0 MiB"
    assert h.check(HealthSample(rss=1, fds=33, cpu_percent=0.0)) == \
        "33 open file descriptors is over its limit of 32"


def test_cpu_limit_is_an_average_so_a_start_up_burst_passes() -> None:
    h = HealthCheck(Limits(cpu_percent=50.0))
    assert h.check(HealthSample(0, 0, 100.0)) is None          # a burst alone: window not full
    for _ in range(CPU_WINDOW - 2):
        assert h.check(HealthSample(0, 0, 0.0)) is None
    assert h.check(HealthSample(0, 0, 10.0)) is None           # full window, average 22%
    for _ in range(CPU_WINDOW - 1):
        h.check(HealthSample(0, 0, 90.0))
    reason = h.check(HealthSample(0, 0, 90.0))
    assert reason is not None and reason == "cpu 90% averaged over 5 samples is over its limit of 50%"
    h.reset()
    assert h.check(HealthSample(0, 0, 90.0)) is None


def test_no_limits_never_trip() -> None:
    h = HealthCheck(Limits())
    for _ in range(10):
        assert h.check(HealthSample(1 << 40, 1 << 20, 800.0)) is None


# ---- control protocol --------------------------------------------------------------

def _reply(proto: ControlProtocol, payload: bytes) -> dict:
    return msgpack.unpackb(proto.handle_bytes(payload), raw=False)


def test_control_protocol_answers_everything() -> None:
    def boom(req: dict) -> dict:
        raise RuntimeError("a bug")

    def named(req: dict) -> dict:
        return {"name": string_field(req, "name")}
    proto = ControlProtocol({"ping": lambda req: {"pong": 1}, "boom": boom, "named": named,
                             "refuse": lambda req: (_ for _ in ()).throw(ControlError.of(16, "busy"))})
    assert _reply(proto, msgpack.packb({"op": "ping"})) == {"ok": True, "pong": 1}
    bad = [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"op": 7}), msgpack.packb({"op": "nope"}),
           msgpack.packb({"no": "op"}), b"x" * 70000, msgpack.packb({"op": "named"}),
           msgpack.packb({"op": "named", "name": 3}), msgpack.packb({1: 2})]
    for payload in bad:
        r = _reply(proto, payload)
        assert r["ok"] is False and r["errno"] in ("EBADMSG", "ENOSYS", "EMSGSIZE", "EINVAL"), (payload[:20], r)
        assert r["error"]
    assert _reply(proto, msgpack.packb({"op": "boom"}))["errno"] == "EIO"
    assert _reply(proto, msgpack.packb({"op": "refuse"})) == {"ok": False, "errno": "EBUSY", "error": "busy"}
    assert _reply(proto, msgpack.packb({"op": "named", "name": "g1"})) == {"ok": True, "name": "g1"}


# ---- layout, pid file, kinds ---------------------------------------------------------

def test_layout_refuses_socket_paths_too_long_for_unix_sockets() -> None:
    Layout("/var/lib/xdom/t", "/run/xdom/t").check()
    long_run = "/tmp/" + "r" * 90
    with pytest.raises(LayoutError, match="too long.*112 bytes, more than the 107"):
        Layout("/var/lib/xdom/t", long_run).check()
    with pytest.raises(LayoutError, match="absolute"):
        Layout("state", "/run/xdom/t").check()


def test_topology_name_is_a_safe_path_component() -> None:
    assert topology_name("/etc/xdom/default.toml") == "default"
    assert topology_name("a b/c$d.toml") == "c_d"
    assert topology_name("/x/.toml") == "toml"
    assert topology_name("/x/...") == "default"


def test_pid_file_is_exclusive_and_stale_once_released(run_dir: str) -> None:
    path = os.path.join(run_dir, "supervisor.pid")
    first = PidFile(path)
    first.acquire()
    assert running_pid(run_dir) == os.getpid()
    second = PidFile(path)
    with pytest.raises(LayoutError, match=f"pid {os.getpid()}.*already runs"):
        second.acquire()
    assert not second.held
    first.release()
    assert not os.path.exists(path) and running_pid(run_dir) is None
    with open(path, "w") as f:          # a pid file left by a crash names a pid nobody holds
        f.write("1\n")
    assert running_pid(run_dir) is None
