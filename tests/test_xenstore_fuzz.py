"""Hostile and random input into xenstored's core.

Invariants (h11's fuzz harness style): whatever arrives, ``handle`` does not
raise, every request gets exactly one reply echoing its req_id and tx_id
(its own type, or XS_ERROR with one of Xen's errno names), no request trips
the core's internal-error path, and the tree stays a tree whose accounting
matches it.  Plus a model check: with privileged, non-transactional requests
only, the store behaves like a dict of paths.
"""

from __future__ import annotations

from collections.abc import Hashable

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xdom.backends.xenstored.core import XenstoreCore
from xdom.domains.abi.xs_wire import XSD_ERRORS, Message, XsType

T = XsType
CONNS = {"dom0": 0, "dom5": 5, "dom6": 6}

NAMES = st.sampled_from(["a", "b", "c", "@x", "local", "domain", "5", "6", "tool"])
PATHS = st.builds(lambda absolute, parts: ("/" if absolute else "") + "/".join(parts),
                  st.booleans(), st.lists(NAMES, min_size=0, max_size=4)) | st.sampled_from(
    ["/", "@introduceDomain", "@releaseDomain", "/local/domain/5", "/local/domain/6/x", "//", "/a/"])
FIELD = PATHS.map(str.encode) | st.binary(max_size=12) | st.sampled_from(
    [b"T", b"F", b"0", b"5", b"6", b"7", b"n0", b"r5", b"b6", b"w5", b"n5", b"1", b"99999999999", b"-1"])
PAYLOADS = st.binary(max_size=64) | st.lists(FIELD, max_size=5).map(lambda f: b"\0".join(f)) | st.lists(
    FIELD, max_size=5).map(lambda f: b"".join(x + b"\0" for x in f))
TYPES = st.integers(0, 27) | st.sampled_from([0xFFFF, 2**32 - 1, 1000])
TX_IDS = st.sampled_from([0, 0, 0, 1, 2, 3]) | st.integers(0, 2**32 - 1)
MESSAGES = st.builds(Message, TYPES, st.integers(0, 2**32 - 1), TX_IDS, PAYLOADS)


def new_core() -> XenstoreCore:
    core = XenstoreCore()
    for conn, domid in CONNS.items():
        core.connect(conn, domid)
    core.handle("dom0", Message(T.XS_MKDIR, 1, 0, b"/local/domain/5\0"))
    core.handle("dom0", Message(T.XS_SET_PERMS, 2, 0, b"/local/domain/5\0n5\0r6\0"))
    core.take_output()
    return core


def send(core: XenstoreCore, conn: Hashable, msg: Message) -> Message:
    """The invariants of one request; returns its reply."""
    core.handle(conn, msg)
    out = core.take_output()
    replies = [m for k, m in out if k == conn and m.type != T.XS_WATCH_EVENT]
    assert len(replies) == 1, (msg, out)
    reply = replies[0]
    assert (reply.req_id, reply.tx_id) == (msg.req_id, msg.tx_id)
    assert reply.type in (msg.type, T.XS_ERROR)
    if reply.type == T.XS_ERROR:
        assert reply.error_name in XSD_ERRORS
    for _, m in out:
        if m.type == T.XS_WATCH_EVENT:
            assert (m.req_id, m.tx_id) == (0, 0) and m.payload.count(b"\0") >= 2
            assert len(m.payload) <= 4096
    assert core.internal_errors == 0
    return reply


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(CONNS)), MESSAGES), min_size=1, max_size=25))
def test_any_message_gets_exactly_one_reply(batch: list[tuple[str, Message]]) -> None:
    core = new_core()
    for conn, msg in batch:
        send(core, conn, msg)
    assert core.check() == []
    XenstoreCore.restore(core.dump())       # whatever happened, the state can be saved and read back


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_restore_of_garbage_raises_only_value_error(data: bytes) -> None:
    try:
        XenstoreCore.restore(data)
    except ValueError:
        pass


# ---- model check: privileged, non-transactional requests behave like a dict -------------------------

OPS = st.lists(st.tuples(st.sampled_from(["write", "mkdir", "rm", "read", "dir"]),
                         st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
                         st.binary(max_size=8)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_store_matches_a_dict_model(ops: list[tuple[str, list[str], bytes]]) -> None:
    core = XenstoreCore()
    core.connect("c", 0)
    model: dict[str, bytes] = {"/": b"", "/tool": b"", "/tool/xenstored": b""}
    children: dict[str, list[str]] = {"/": ["tool"], "/tool": ["xenstored"], "/tool/xenstored": []}

    def add(path: str, value: bytes | None) -> None:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            p = "/" + "/".join(parts[:depth])
            if p not in model:
                model[p] = b""
                children[p] = []
                children["/" + "/".join(parts[:depth - 1]) if depth > 1 else "/"].append(parts[depth - 1])
        if value is not None:
            model[path] = value

    def remove(path: str) -> None:
        for p in [p for p in model if p == path or p.startswith(path + "/")]:
            del model[p]
            del children[p]
        parent = path.rsplit("/", 1)[0] or "/"
        children[parent].remove(path.rsplit("/", 1)[1])

    for i, (op, parts, value) in enumerate(ops):
        path = "/" + "/".join(parts)
        parent = path.rsplit("/", 1)[0] or "/"
        if op == "write":
            reply = send(core, "c", Message(T.XS_WRITE, i, 0, path.encode() + b"\0" + value))
            assert reply.payload == b"OK\0"
            add(path, value)
        elif op == "mkdir":
            assert send(core, "c", Message(T.XS_MKDIR, i, 0, path.encode() + b"\0")).payload == b"OK\0"
            add(path, None)
        elif op == "rm":
            reply = send(core, "c", Message(T.XS_RM, i, 0, path.encode() + b"\0"))
            if path in model:
                remove(path)
                assert reply.payload == b"OK\0"
            else:
                assert reply.error_name == (None if parent in model else "ENOENT")
        elif op == "read":
            reply = send(core, "c", Message(T.XS_READ, i, 0, path.encode() + b"\0"))
            assert (reply.payload if reply.type == T.XS_READ else None) == model.get(path)
        else:
            reply = send(core, "c", Message(T.XS_DIRECTORY, i, 0, path.encode() + b"\0"))
            if path in model:
                assert reply.payload == b"".join(c.encode() + b"\0" for c in children[path])
            else:
                assert reply.error_name == "ENOENT"
        assert core.node_count() == len(model)
    assert core.check() == []


# ---- stateful: many connections, transactions, watches and domain life cycles ------------------------

class XenstoreMachine(RuleBasedStateMachine):
    """Random interleavings; after every step the tree and its accounting must be sound."""

    @initialize()
    def setup(self) -> None:
        self.core = new_core()
        self.req = 100
        self.txs: dict[str, list[int]] = {c: [] for c in CONNS}

    def _send(self, conn: str, type_: int, payload: bytes, tx: int = 0) -> Message:
        self.req += 1
        return send(self.core, conn, Message(type_, self.req, tx, payload))

    def _tx(self, conn: str, data: st.DataObject) -> int:
        return data.draw(st.sampled_from([0] + self.txs[conn])) if self.txs[conn] else 0

    @rule(conn=st.sampled_from(sorted(CONNS)), path=PATHS, value=st.binary(max_size=16), data=st.data())
    def write(self, conn: str, path: str, value: bytes, data: st.DataObject) -> None:
        self._send(conn, T.XS_WRITE, path.encode() + b"\0" + value, self._tx(conn, data))

    @rule(conn=st.sampled_from(sorted(CONNS)), path=PATHS, data=st.data())
    def rm(self, conn: str, path: str, data: st.DataObject) -> None:
        self._send(conn, T.XS_RM, path.encode() + b"\0", self._tx(conn, data))

    @rule(conn=st.sampled_from(sorted(CONNS)), path=PATHS, data=st.data())
    def mkdir(self, conn: str, path: str, data: st.DataObject) -> None:
        self._send(conn, T.XS_MKDIR, path.encode() + b"\0", self._tx(conn, data))

    @rule(conn=st.sampled_from(sorted(CONNS)), path=PATHS,
          perms=st.lists(st.sampled_from(["n0", "r5", "b6", "n5", "w6", "r7", "n6"]), min_size=1, max_size=4),
          data=st.data())
    def set_perms(self, conn: str, path: str, perms: list[str], data: st.DataObject) -> None:
        payload = path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        self._send(conn, T.XS_SET_PERMS, payload, self._tx(conn, data))

    @rule(conn=st.sampled_from(sorted(CONNS)), path=PATHS, token=st.sampled_from([b"t", b"u"]))
    def watch(self, conn: str, path: str, token: bytes) -> None:
        self._send(conn, T.XS_WATCH, path.encode() + b"\0" + token + b"\0")

    @rule(conn=st.sampled_from(sorted(CONNS)), path=PATHS, token=st.sampled_from([b"t", b"u"]))
    def unwatch(self, conn: str, path: str, token: bytes) -> None:
        self._send(conn, T.XS_UNWATCH, path.encode() + b"\0" + token + b"\0")

    @rule(conn=st.sampled_from(sorted(CONNS)))
    def start(self, conn: str) -> None:
        reply = self._send(conn, T.XS_TRANSACTION_START, b"\0")
        if reply.type == T.XS_TRANSACTION_START:
            self.txs[conn].append(int(reply.payload[:-1]))

    @precondition(lambda self: any(self.txs.values()))
    @rule(data=st.data(), commit=st.booleans())
    def end(self, data: st.DataObject, commit: bool) -> None:
        conn = data.draw(st.sampled_from([c for c, t in self.txs.items() if t]))
        tx = data.draw(st.sampled_from(self.txs[conn]))
        self.txs[conn].remove(tx)
        reply = self._send(conn, T.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)
        assert reply.type == T.XS_TRANSACTION_END or reply.error_name in ("EAGAIN", "ENOMEM", "ENOSPC")

    @rule(domid=st.sampled_from([5, 6, 7]), release=st.booleans())
    def domain_life(self, domid: int, release: bool) -> None:
        self._send("dom0", T.XS_INTRODUCE, f"{domid}\0{domid}\0{domid}\0".encode())
        if release:
            self._send("dom0", T.XS_RELEASE, f"{domid}\0".encode())
        else:
            self.core.domain_gone(domid)
        self.core.take_output()
        for conn, d in CONNS.items():       # the shell drops a released domain's connection
            if d == domid:
                self.core.connect(conn, d)
                self.txs[conn] = []
        self.core.take_output()

    @rule()
    def restart(self) -> None:
        """A SIGKILL and restore: the state must survive a dump and come back whole."""
        dump = self.core.dump()
        restored = XenstoreCore.restore(dump)
        before, after = msgpack.unpackb(dump), msgpack.unpackb(restored.dump())
        assert after["nodes"] == before["nodes"] and after["domains"] == before["domains"]
        assert restored.node_count() == self.core.node_count()
        self.core = restored
        for conn, domid in CONNS.items():
            self.core.connect(conn, domid)
        self.core.take_output()
        self.txs = {c: [] for c in CONNS}

    @invariant()
    def sound(self) -> None:
        if hasattr(self, "core"):
            assert self.core.check() == []


TestXenstoreMachine = XenstoreMachine.TestCase
TestXenstoreMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
