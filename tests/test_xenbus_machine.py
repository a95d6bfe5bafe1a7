"""The xenbus state machine (domains/xenbus_machine.py): every pair of states, and the two ends run together.

The exhaustive tests go over all 81 (own, peer) pairs of each table.  The
property tests run a backend and a frontend against each other on a model
of xenstore's watches (a handler reads the peer's node when it runs, so it
may miss values the node took in between), in orders hypothesis chooses,
through a peer's restart or a detach, and check where they end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.domains import xenbus_machine as m
from xdom.domains.xenbus_machine import (
    BACKEND,
    BACKEND_FAILED,
    BACKEND_STEPS,
    BACKEND_WRITES,
    FRONTEND,
    FRONTEND_FAILED,
    FRONTEND_STEPS,
    FRONTEND_WRITES,
    BackendAction,
    FrontendAction,
    XenbusState,
    backend_action,
    frontend_action,
    legal_step,
)

S = XenbusState
B = BackendAction
F = FrontendAction
PAIRS = [(own, peer) for own in S for peer in S]
BACKEND_HOLDS = (S.Initialising, S.InitWait, S.Connected, S.Closing, S.Closed)    # what a backend ever writes
FRONTEND_HOLDS = (S.Initialising, S.Initialised, S.Connected, S.Closing, S.Closed)
HEADER = "/usr/include/xen/io/xenbus.h"


# ---- the enum is Xen's ----------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(HEADER) or not shutil.which("gcc"),
                    reason="needs Debian's libxen-dev and gcc (make test installs them as root)")
def test_states_match_xen_headers(tmp_path: os.PathLike[str]) -> None:
    src, exe = os.path.join(tmp_path, "xb.c"), os.path.join(tmp_path, "xb")
    with open(src, "w") as f:
        f.write("#include <stdio.h>\n#include <xen/io/xenbus.h>\nint main(void) {\n"
                + "".join(f'printf("{s.name} %d\\n", (int)XenbusState{s.name});\n' for s in S) + "return 0; }\n")
    subprocess.run(["gcc", "-Wall", "-o", exe, src], check=True, capture_output=True)
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    assert {k: int(v) for k, v in (line.split() for line in out.splitlines())} == {s.name: int(s) for s in S}
    with open(HEADER) as f:
        header = f.read()
    assert set(re.findall(r"XenbusState(\w+)\s*=", header)) == {s.name for s in S}


# ---- every pair -----------------------------------------------------------------------------------

def test_the_tables_are_total() -> None:
    assert set(BACKEND) == set(PAIRS) and set(FRONTEND) == set(PAIRS)
    assert all(isinstance(a, BackendAction) for a in BACKEND.values())
    assert all(isinstance(a, FrontendAction) for a in FRONTEND.values())
    assert set(BACKEND_WRITES) == set(B) and set(FRONTEND_WRITES) == set(F)


@pytest.mark.parametrize("own,peer", PAIRS)
def test_every_backend_action_is_a_legal_step(own: XenbusState, peer: XenbusState) -> None:
    action = backend_action(own, peer)
    for writes in (BACKEND_WRITES[action], BACKEND_FAILED.get(action, ())):
        if action is B.PROBE and writes == (S.InitWait,):     # then what the frontend's state asks of InitWait
            then = backend_action(S.InitWait, peer)
            assert then is not B.PROBE
            writes = writes + BACKEND_WRITES[then]
        assert legal_step(BACKEND_STEPS, own, writes), (own, peer, action, writes)


@pytest.mark.parametrize("own,peer", PAIRS)
def test_every_frontend_action_is_a_legal_step(own: XenbusState, peer: XenbusState) -> None:
    action = frontend_action(own, peer)
    for writes in (FRONTEND_WRITES[action], FRONTEND_FAILED.get(action, ())):
        assert legal_step(FRONTEND_STEPS, own, writes), (own, peer, action, writes)


def test_states_an_end_never_holds_do_nothing() -> None:
    for own in set(S) - set(BACKEND_HOLDS):
        assert {backend_action(own, peer) for peer in S} == {B.NONE}, own
    for own in set(S) - set(FRONTEND_HOLDS):
        assert {frontend_action(own, peer) for peer in S} == {F.NONE}, own


def test_closing_is_answered_by_closed() -> None:
    # A detach (the toolstack or the backend closing): the frontend ends Closed, through Closing.
    for own in (S.Initialising, S.Initialised, S.Connected):
        for backend in (S.Closing, S.Closed):
            if (own, backend) != (S.Initialising, S.Closed):   # left by an earlier frontend: it answers InitWait
                assert FRONTEND_WRITES[frontend_action(own, backend)] == (S.Closing, S.Closed), (own, backend)
    assert backend_action(S.Closed, S.Initialising) is B.RESET
    # The backend follows the frontend to Closing, then Closed; a frontend that is gone is Closed too.
    for own in BACKEND_HOLDS[1:]:
        assert own == S.Closing or BACKEND_WRITES[backend_action(own, S.Closing)] == (S.Closing,), own
        for frontend in (S.Closed, S.Unknown):
            assert own == S.Closed or BACKEND_WRITES[backend_action(own, frontend)] == (S.Closed,), own


def test_a_backend_connects_only_to_fresh_rings_and_only_once() -> None:
    for (own, peer), action in BACKEND.items():
        if action is B.CONNECT:
            assert peer == S.Initialised and own != S.Connected
    # A restarted backend (InitWait) does not take a Connected frontend's rings: they were its predecessor's.
    assert backend_action(S.InitWait, S.Connected) is B.NONE


def test_a_frontend_whose_backend_is_away_waits() -> None:
    for backend in (S.Unknown, S.Initialising):
        assert frontend_action(S.Connected, backend) is F.WAIT
    assert frontend_action(S.Connected, S.InitWait) is F.RECONNECT
    for (own, peer), action in FRONTEND.items():
        if action in (F.RECONNECT, F.WAIT):
            assert own == S.Connected
        if action is F.CONNECT:
            assert (own, peer) == (S.Initialised, S.Connected)


def test_the_docstring_tables_are_the_tables() -> None:
    doc = m.__doc__ or ""
    names = {"Reconf*": (S.Reconfiguring, S.Reconfigured)}
    for title, table, enum in (("Backend", BACKEND, B), ("Frontend", FRONTEND, F)):
        text = doc[doc.index(f"\n{title} (own state down"):]
        lines = text.split("::\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
        header = lines[0].split()
        columns = [c for h in header for c in (names[h] if h in names else (S[h],))]
        assert set(columns) == set(S)
        rows = {}
        for line in lines[1:]:
            own, *cells = line.split()
            cells = [c for h, cell in zip(header, cells, strict=True) for c in [cell] * len(names.get(h, (0,)))]
            rows[S[own]] = {peer: enum.NONE if cell == "." else enum[cell] for peer, cell in zip(columns, cells, strict=True)}
        assert {(own, peer): a for own, row in rows.items() for peer, a in row.items()} == \
            {k: v for k, v in table.items() if k[0] in rows}, title
        assert all(v is enum.NONE for k, v in table.items() if k[0] not in rows)


# ---- the two ends together ------------------------------------------------------------------------

@dataclass
class Pair:
    """A backend and a frontend on a model of xenstore: each end's node, each end's own state, and which
    watch handlers have an event waiting (a handler reads the nodes when it runs)."""
    be_own: XenbusState = S.Connected
    be_node: XenbusState = S.Connected
    fe_own: XenbusState = S.Connected
    fe_node: XenbusState = S.Connected
    be_alive: bool = True
    fe_alive: bool = True
    pending: set[str] = field(default_factory=set)      # "be" (frontend's node changed), "be-own", "fe"
    connect_failures: int = 0
    fe_closed: bool = False                             # the frontend wrote Closing or Closed
    backend_log: list[tuple[XenbusState, XenbusState, BackendAction]] = field(default_factory=list)

    def write_be(self, state: XenbusState) -> None:
        self.be_node = state
        self.pending |= {"fe", "be-own"}

    def write_fe(self, state: XenbusState) -> None:
        self.fe_node = state
        self.pending.add("be")

    def run(self, handler: str) -> None:
        self.pending.discard(handler)
        if handler == "be-own":
            # backends/xenbus_backend.py: the toolstack wrote our node back to Initialising: start over.
            if self.be_alive and self.be_node == S.Initialising:
                self.be_own = S.Initialising
                self.backend_step()
        elif handler == "be":
            if self.be_alive:
                self.backend_step()
        elif self.fe_alive:
            self.frontend_step()

    def backend_step(self) -> None:
        peer = self.fe_node
        action = backend_action(self.be_own, peer)
        self.backend_log.append((self.be_own, peer, action))
        if action is B.PROBE:
            self._be_writes(BACKEND_WRITES[action])
            action = backend_action(self.be_own, peer)
            self.backend_log.append((self.be_own, peer, action))
        fails = action is B.CONNECT and self.connect_failures > 0
        if fails:
            self.connect_failures -= 1
        self._be_writes(BACKEND_FAILED[action] if fails else BACKEND_WRITES[action])

    def _be_writes(self, writes: tuple[XenbusState, ...]) -> None:
        for state in writes:
            self.be_own = state
            self.write_be(state)

    def frontend_step(self) -> None:
        action = frontend_action(self.fe_own, self.be_node)
        for state in FRONTEND_WRITES[action]:
            self.fe_own = state
            self.write_fe(state)
            self.fe_closed |= state in (S.Closing, S.Closed)

    def settle(self, order: list[int], limit: int = 200) -> None:
        """Run waiting handlers, first in ``order`` (indexes into the sorted waiting set), then in turn,
        until none waits; ``limit`` steps mean the two ends never settle."""
        order = list(order)
        for _ in range(limit):
            if not self.pending:
                return
            waiting = sorted(self.pending)
            self.run(waiting[order.pop(0) % len(waiting)] if order else waiting[0])
        raise AssertionError(f"no end to the handshake: {self}")

    def connected(self) -> bool:
        return self.be_own == self.be_node == self.fe_own == self.fe_node == S.Connected

    def handshake(self, order: list[int]) -> None:
        """A fresh device: the toolstack's nodes, the backend's probe, the frontend's connect()."""
        self.be_own = self.be_node = self.fe_own = self.fe_node = S.Initialising
        self.backend_step()                 # DeviceTable: probe (PROBE), then its watches fire
        self.pending |= {"be", "be-own"}
        self.write_fe(S.Initialising)       # Blkfront/Netfront.connect(): Initialising, then its watch fires
        self.pending.add("fe")
        self.settle(order)


orders = st.lists(st.integers(min_value=0, max_value=2), max_size=30)


@settings(max_examples=300, deadline=None)
@given(order=orders)
def test_a_fresh_device_connects_whatever_the_order_of_events(order: list[int]) -> None:
    pair = Pair()
    pair.handshake(order)
    assert pair.connected(), pair


@settings(max_examples=500, deadline=None)
@given(gone=st.sampled_from([S.Unknown, S.Initialising, S.Closed]), seen=st.integers(0, 2),
       recreated=st.booleans(), order=orders, before=orders)
def test_a_restarting_frontend_gets_its_device_back(gone: XenbusState, seen: int, recreated: bool,
                                                    order: list[int], before: list[int]) -> None:
    """The frontend's domain dies (its node goes ``gone``), the backend may see that ``seen`` times; the
    toolstack may write the device again (it must when the frontend's nodes went); a new frontend starts."""
    pair = Pair()
    pair.fe_alive = False
    pair.write_fe(gone)
    for _ in range(seen):
        pair.run("be")
    if recreated or gone == S.Unknown:
        pair.write_be(S.Initialising)               # deploy/vbd.py's add_vbd: the backend's node...
        if gone == S.Unknown:
            pair.write_fe(S.Initialising)           # ... and the frontend's, if it has no state node
    pair.settle(before)
    pair.fe_alive, pair.fe_own = True, S.Initialising
    pair.write_fe(S.Initialising)                   # the new frontend's connect()
    pair.pending.add("fe")
    pair.settle(order)
    assert pair.connected(), pair


@settings(max_examples=500, deadline=None)
@given(gone=st.sampled_from([S.Connected, S.Unknown, S.Initialising]), seen=st.integers(0, 2),
       order=orders, before=orders)
def test_a_restarting_backend_is_a_stall_for_the_frontend(gone: XenbusState, seen: int, order: list[int],
                                                          before: list[int]) -> None:
    """The driver domain dies, its node left as it was (Connected), gone or written Initialising (``gone``);
    the frontend may see it ``seen`` times; the toolstack writes the device again and starts a new backend,
    which probes.  The frontend never closes.  (A backend's Closed is a detach, not a restart: see
    test_a_detach_closes_both_ends.)"""
    pair = Pair()
    pair.be_alive = False
    pair.write_be(gone)
    for _ in range(seen):
        pair.run("fe")
    pair.settle(before)
    pair.write_be(S.Initialising)                   # add_vbd again
    pair.be_alive, pair.be_own = True, S.Initialising
    pair.backend_step()                             # the new backend's probe
    pair.pending |= {"be", "be-own"}
    pair.settle(order)
    assert pair.connected() and not pair.fe_closed, pair


@settings(max_examples=300, deadline=None)
@given(order=orders, during=st.integers(0, 8), before=orders)
def test_a_detach_closes_both_ends(order: list[int], during: int, before: list[int]) -> None:
    """libxl's detach: the toolstack writes the backend's node Closing (its own state is unchanged, as for
    Linux's cached dev->state); both ends end Closed, from a connected device or part-way through a
    handshake that has gone at least as far as the frontend's Initialised."""
    pair = Pair()
    pair.be_own = pair.be_node = pair.fe_own = pair.fe_node = S.Initialising
    pair.backend_step()
    pair.pending |= {"be", "be-own"}
    pair.write_fe(S.Initialising)
    pair.pending.add("fe")
    for _ in range(during):
        if pair.pending:
            pair.run(sorted(pair.pending)[(before.pop(0) if before else 0) % len(pair.pending)])
    if pair.fe_own == S.Initialised and pair.be_own != S.Connected:
        pair.settle([])         # the backend's connection would overwrite the toolstack's Closing (as in Linux)
    pair.write_be(S.Closing)
    pair.settle(order)
    assert pair.fe_own == pair.fe_node == S.Closed and pair.be_own == pair.be_node == S.Closed, pair


@settings(max_examples=300, deadline=None)
@given(failures=st.integers(1, 3), order=orders)
def test_a_backend_that_cannot_connect_closes_the_device_and_stops(failures: int, order: list[int]) -> None:
    pair = Pair(connect_failures=failures)
    pair.handshake(order)
    assert pair.fe_own == S.Closed and pair.be_own in (S.Closing, S.Closed), pair


# ---- one end against a hostile peer ---------------------------------------------------------------

BACKEND_ANSWER = {S.Unknown: S.Closed, S.Initialising: S.InitWait, S.Initialised: S.Connected,
                  S.Closing: S.Closing, S.Closed: S.Closed}
"""Where a backend stands once it has handled a frontend state (the others leave it where it was)."""


@settings(max_examples=500, deadline=None)
@given(states=st.lists(st.sampled_from(list(S)), min_size=1, max_size=40), start=st.sampled_from(BACKEND_HOLDS))
def test_a_backend_answers_whatever_a_hostile_frontend_writes(states: list[XenbusState], start: XenbusState) -> None:
    pair = Pair(be_own=start, be_node=start)
    for state in states:
        before = pair.be_own
        pair.fe_node = state
        pair.run("be")
        assert pair.be_own == BACKEND_ANSWER.get(state, S.InitWait if before == S.Initialising else before)
        assert pair.be_own in BACKEND_HOLDS
    connects = [own for own, _, action in pair.backend_log if action is B.CONNECT]
    assert S.Connected not in connects                  # never maps a second connection over the first


@settings(max_examples=500, deadline=None)
@given(states=st.lists(st.sampled_from(list(S)), min_size=1, max_size=40),
       start=st.sampled_from(FRONTEND_HOLDS[:3]))
def test_a_frontend_answers_whatever_a_backend_writes(states: list[XenbusState], start: XenbusState) -> None:
    pair = Pair(fe_own=start, fe_node=start)
    for state in states:
        before = pair.fe_own
        pair.be_node = state
        pair.run("fe")
        if before == S.Closed:
            assert pair.fe_own == S.Closed              # final
        elif state == S.Closing or (state == S.Closed and before != S.Initialising):
            assert pair.fe_own == S.Closed
        elif state == S.InitWait:
            assert pair.fe_own == S.Initialised         # talked (again, if it was Connected)
        elif state == S.Connected and before == S.Initialised:
            assert pair.fe_own == S.Connected
        else:
            assert pair.fe_own == before
