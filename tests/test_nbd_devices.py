"""The devices behind an NBD export: the file-backed one, and how the server copes with the others.

A device that completes twice or fails, one that holds submissions back
until unplugged and completes in batches (on its own threads or reaped by
the connection's thread), one that lends its own memory for WRITE payloads.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from nbd_serving import RawClient, serving, short_sock_dir
from nbd_wire import MiB, req

from xdom.domains.blockdev import BlockDevice, FileBlockDevice, completion_batch, current_completion_batch
from xdom.domains.nbd.wire import Cmd, CmdFlag, NbdErr

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with short_sock_dir() as d:
        yield d


# --- the file-backed device ------------------------------------------------------------


def _wait(submit: Any, *args: Any) -> tuple[Any, ...]:
    box: list[tuple[Any, ...]] = []
    done = threading.Event()

    def cb(*res: Any) -> None:
        res = tuple(bytes(r[0]) if isinstance(r, list) and r else r for r in res)
        box.append(res + (threading.get_ident(),))
        done.set()

    submit(*args, cb)
    assert done.wait(30)
    return box[0]


def test_file_device_completes_on_other_threads_and_validates(tmp_path: Any) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(64 * 1024) + b"tail")          # tail is not a whole sector
    with FileBlockDevice(img, 512, workers=3) as dev:
        assert isinstance(dev, BlockDevice)
        assert dev.size == 64 * 1024 and dev.can_flush and dev.can_write_zeroes
        err, data, tid = _wait(dev.submit_read, 512, 1024)
        assert err == 0 and data == img.read_bytes()[512:1536] and tid != threading.get_ident()
        assert _wait(dev.submit_write, 0, memoryview(b"x" * 512), True)[0] == 0
        assert img.read_bytes()[:512] == b"x" * 512
        assert _wait(dev.submit_read, 64 * 1024 - 512, 1024)[0] == errno.EINVAL
        assert _wait(dev.submit_write_zeroes, 0, 4096, False)[0] == 0
        assert img.read_bytes()[:4096] == bytes(4096)
        assert _wait(dev.submit_flush)[0] == 0
    with FileBlockDevice(img, 4096, read_only=True) as ro:
        assert ro.size == 64 * 1024 and not ro.can_trim and not ro.can_write_zeroes
        assert _wait(ro.submit_write, 0, memoryview(bytes(4096)), False)[0] == errno.EPERM
    box: list[int] = []
    dev.submit_flush(box.append)                          # closed device: ESHUTDOWN, inline
    assert box == [errno.ESHUTDOWN]


class _FaultyDevice:
    """Wraps a device to misbehave: short reads, exceptions, double and
    synchronous completions -- what a buggy frontend might do."""

    def __init__(self, inner: FileBlockDevice) -> None:
        self._inner = inner
        for a in ("size", "sector_size", "read_only", "can_trim", "can_write_zeroes", "can_flush",
                  "can_multi_conn"):
            setattr(self, a, getattr(inner, a))

    def submit_read(self, offset: int, length: int, done: Any) -> None:
        if offset == 0:
            done(0, [b"short"])                          # wrong length, inline
        elif offset == 4096:
            raise RuntimeError("device exploded")
        else:
            self._inner.submit_read(offset, length, done)

    def submit_reads(self, reads: list[tuple[int, int, Any]]) -> None:
        if any(offset == 4096 for offset, _, _ in reads):
            self._inner.submit_read(8192, 4096, reads[-1][2])    # takes one, then explodes
            raise RuntimeError("device exploded on a run of reads")
        for offset, length, done in reads:
            self.submit_read(offset, length, done)

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Any) -> None:
        done(0)                                          # twice: the second must be ignored
        done(errno.EIO)

    def submit_flush(self, done: Any) -> None:
        done(errno.EDQUOT)

    def submit_trim(self, offset: int, length: int, done: Any) -> None:
        self._inner.submit_trim(offset, length, done)

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Any) -> None:
        self._inner.submit_write_zeroes(offset, length, may_trim, done)


def test_misbehaving_device_yields_errors_not_a_broken_stream(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir, device=_FaultyDevice) as (_srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        c.send(Cmd.READ, 1, 0, 4096)
        assert c.reply() == (1, NbdErr.EIO, b"")
        c.send(Cmd.READ, 2, 4096, 4096)
        assert c.reply() == (2, NbdErr.EIO, b"")
        c.send(Cmd.WRITE, 3, 0, 512, 0, bytes(512))
        assert c.reply() == (3, 0, b"")
        c.send(Cmd.FLUSH, 4)
        assert c.reply() == (4, NbdErr.ENOSPC, b"")
        c.send(Cmd.TRIM, 5, 0, 4096, CmdFlag.FUA)       # trim, then a flush for FUA
        assert c.reply() == (5, NbdErr.ENOSPC, b"")
        c.send(Cmd.READ, 6, 8192, 4096)
        assert c.reply() == (6, 0, bytes(4096))
        # A run of reads in one recv (submit_reads) the device fails half way, having taken one: each
        # gets one reply, EIO (or the data, if the device completed the one it took first).
        c.pending.update({7: (Cmd.READ, 4096), 8: (Cmd.READ, 4096)})
        c.sock.sendall(req(Cmd.READ, 7, 4096, 4096) + req(Cmd.READ, 8, 4096, 4096))
        first, second = sorted([c.reply(), c.reply()])
        assert first == (7, NbdErr.EIO, b"") and second in ((8, NbdErr.EIO, b""), (8, 0, bytes(4096)))
        c.send(Cmd.READ, 9, 8192, 4096)
        assert c.reply() == (9, 0, bytes(4096))
        c.close()


class _RingLikeDevice:
    """Shaped like blkfront: ``plug()``/``unplug()`` hold submissions back (nothing runs until unplug),
    and what is pushed completes in one batch inside ``completion_batch()``, on a thread of its own or,
    while a reaper is attached, on the reaper's thread (``completion_fd``/``reap_completions``); a read's
    buffer is scribbled over as soon as its ``done`` returns (``keeps``: once the batch has ended)."""

    keeps = False

    def __init__(self, inner: FileBlockDevice) -> None:
        for a in ("size", "sector_size", "read_only", "can_trim", "can_write_zeroes", "can_flush",
                  "can_multi_conn"):
            setattr(self, a, getattr(inner, a))
        self._fd = os.open(inner.path, os.O_RDWR)
        self._lock = threading.Lock()
        self._plugged: set[int] = set()
        self._held: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.plugs = self.batches = 0
        self.in_batch: list[bool] = []
        self.threads_used: set[str] = set()
        self.submitted: list[tuple[str, int]] = []      # (what, offset) in the order the server submitted
        self._kept = threading.local()

    def _run(self, ops: list[Any]) -> None:
        self.batches += 1
        kept: list[bytearray] = []
        self._kept.bufs = kept
        with completion_batch(keeps_buffers=self.keeps):
            for op in ops:
                op()
        for buf in kept:
            buf[:] = b"\xa5" * len(buf)

    def plug(self) -> None:
        with self._lock:
            assert threading.get_ident() not in self._plugged, "plugged twice"
            self._plugged.add(threading.get_ident())
            self.plugs += 1

    def unplug(self) -> None:
        with self._lock:
            self._plugged.remove(threading.get_ident())
        self._push()

    def _push(self) -> None:
        with self._lock:
            ops, self._held = self._held, []
        if ops:
            t = threading.Thread(target=self._run, args=(ops,))
            self.threads.append(t)
            t.start()

    def _submit(self, op: Any) -> None:
        with self._lock:
            self._held.append(op)
            plugged = threading.get_ident() in self._plugged
        if not plugged:
            self._push()

    def submit_read(self, offset: int, length: int, done: Any) -> None:
        def op() -> None:
            buf = bytearray(os.pread(self._fd, length, offset))
            self.in_batch.append(current_completion_batch() is not None)
            self.threads_used.add(threading.current_thread().name)
            whole = memoryview(buf)
            done(0, [whole] if length == 4096 or self.keeps else [whole[:length // 2], whole[length // 2:]])
            if self.keeps:
                self._kept.bufs.append(buf)
            else:
                buf[:] = b"\xa5" * length
        self.submitted.append(("read", offset))
        self._submit(op)

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Any) -> None:
        self.submitted.append(("write", offset))

        def op() -> None:
            os.pwrite(self._fd, data, offset)
            done(0)
        self._submit(op)

    def submit_flush(self, done: Any) -> None:
        self.submitted.append(("flush", 0))
        self._submit(lambda: done(0))

    def submit_trim(self, offset: int, length: int, done: Any) -> None:
        self._submit(lambda: done(0))

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Any) -> None:
        self._submit(lambda: done(0))

    def close(self) -> None:
        for t in self.threads:
            t.join()
        os.close(self._fd)


class _ReapedRingDevice(_RingLikeDevice):
    """The same, but what is pushed is left for a reaper while one is attached: it is "answered"
    (queued, the completion descriptor made readable) and runs in ``reap_completions``."""

    def __init__(self, inner: FileBlockDevice) -> None:
        super().__init__(inner)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._answered: list[Any] = []
        self.reapers = 0

    def completion_fd(self) -> int:
        return self._efd

    def attach_reaper(self) -> None:
        with self._lock:
            self.reapers += 1

    def detach_reaper(self) -> None:
        with self._lock:
            self.reapers -= 1
            answered, self._answered = self._answered, []
        if answered:
            self._run(answered)                         # nobody reaps any more: complete them here

    def reap_completions(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        with self._lock:
            answered, self._answered = self._answered, []
        if answered:
            self._run(answered)

    def _push(self) -> None:
        with self._lock:
            if not self.reapers:
                reap = False
            else:
                reap = True
                ops, self._held = self._held, []
                self._answered += ops
        if reap:
            os.eventfd_write(self._efd, 1)
        else:
            super()._push()

    def close(self) -> None:
        super().close()
        os.close(self._efd)


class _KeepingRingDevice(_ReapedRingDevice):
    """Shaped like blkfront's usual case: a run of READs taken in one ``submit_reads`` call, and each
    read's data in one buffer kept until the completion batch has ended (``keeps_buffers``)."""

    keeps = True

    def __init__(self, inner: FileBlockDevice) -> None:
        super().__init__(inner)
        self.read_runs: list[int] = []

    def submit_reads(self, reads: list[tuple[int, int, Any]]) -> None:
        self.read_runs.append(len(reads))
        for offset, length, done in reads:
            self.submit_read(offset, length, done)


DEVICES = {"device-threads": _RingLikeDevice, "reaped-by-connection": _ReapedRingDevice,
           "runs-of-reads-kept-buffers": _KeepingRingDevice}


@pytest.mark.parametrize("kind", list(DEVICES))
def test_plugged_submissions_and_batched_replies(tmp_path: Any, sock_dir: str, kind: str) -> None:
    """Replies gathered in a completion batch (small reads copied, or sent from buffers the device
    keeps until the batch ends; large ones sent from the device's buffers before ``done`` returns)
    all arrive, matched by handle, with the right data; the server unplugs before it waits for room
    (else nothing held back would ever complete); a device that lets the connection's thread reap
    has its completions run there; one that takes runs of READs gets them, every request still
    submitted in the order the client sent it."""
    content = os.urandom(8 * MiB)
    devices: list[_RingLikeDevice] = []
    reaped = kind != "device-threads"

    def wrap(inner: FileBlockDevice) -> _RingLikeDevice:
        devices.append(DEVICES[kind](inner))
        return devices[0]
    with serving(tmp_path, sock_dir, content=content, device=wrap, max_requests_in_flight=5) as (srv, _i, sock):
        c = RawClient(sock)
        c.handshake()
        expected = {}
        wire = b""
        order = []
        for h in range(60):
            length = (4096, 512, 256 * 1024, 65536 + 512)[h % 4]
            off = (h * 7919 % 64) * 65536
            if h % 5 == 4:
                data = os.urandom(4096)
                c.pending[h] = (Cmd.WRITE, 4096)
                wire += req(Cmd.WRITE, h, 6 * MiB + h * 4096, 4096, 0, data)
                content = content[:6 * MiB + h * 4096] + data + content[6 * MiB + (h + 1) * 4096:]
                expected[h] = b""
                order.append(("write", 6 * MiB + h * 4096))
            else:
                c.pending[h] = (Cmd.READ, length)
                wire += req(Cmd.READ, h, off, length)
                expected[h] = content[off:off + length]
                order.append(("read", off))
        c.pending[99] = (Cmd.FLUSH, 0)
        wire += req(Cmd.FLUSH, 99)
        expected[99] = b""
        order.append(("flush", 0))
        c.sock.sendall(wire)                             # many requests per recv(): plugged submissions
        got = {}
        while c.pending:
            h, err, data = c.reply()
            assert err == 0, h
            got[h] = data
        assert got == expected
        for h in range(8):                               # what was written reads back
            c.send(Cmd.READ, h, 6 * MiB + (h * 5 + 4) * 4096, 4096)
        while c.pending:
            h, err, data = c.reply()
            assert err == 0 and data == content[6 * MiB + (h * 5 + 4) * 4096:][:4096]
        c.send(Cmd.DISC, 0)
        assert c.sock.recv(1) == b""
        c.close()
        dev = devices[0]
        assert dev.plugs and dev.batches and all(dev.in_batch)
        assert dev.submitted[:len(order)] == order
        if isinstance(dev, _KeepingRingDevice):
            assert max(dev.read_runs) > 1, dev.read_runs
        if reaped:
            assert {n.split("-")[1] for n in dev.threads_used} == {"conn"}, dev.threads_used
            for _ in range(600):
                if srv.active_connections == 0:
                    break
                threading.Event().wait(0.05)             # the client saw EOF: the thread ends soon after
            assert dev.reapers == 0                      # detached when the connection ended
        dev.close()


@pytest.mark.parametrize("reaped", [False, True], ids=["device-threads", "reaped-by-connection"])
def test_client_that_sends_everything_before_reading_any_reply(tmp_path: Any, sock_dir: str,
                                                               reaped: bool) -> None:
    """Megabytes of writes and of read replies at once, from a client that reads nothing until it has
    sent everything: replies the socket cannot take wait in the output queue, so reading goes on
    and neither side waits for the other."""
    content = os.urandom(32 * MiB)
    devices: list[_RingLikeDevice] = []

    def wrap(inner: FileBlockDevice) -> _RingLikeDevice:
        devices.append((_ReapedRingDevice if reaped else _RingLikeDevice)(inner))
        return devices[0]
    with serving(tmp_path, sock_dir, content=content, device=wrap) as (_srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        expected = {}
        for h in range(48):                               # 24 MiB each way: more than socket buffers hold
            if h % 2:
                c.send(Cmd.WRITE, h, 16 * MiB + h // 2 * MiB // 2, MiB // 2, 0, os.urandom(MiB // 2))
                expected[h] = b""
            else:
                c.send(Cmd.READ, h, h // 2 * MiB // 2, MiB)
                expected[h] = content[h // 2 * MiB // 2:h // 2 * MiB // 2 + MiB]
        got = {}
        while c.pending:
            h, err, data = c.reply()
            assert err == 0
            got[h] = data
        assert got == expected
        c.close()
        devices[0].close()


class _LendingDevice(_ReapedRingDevice):
    """Also lends memory for WRITE payloads (pieces of 4 KiB, like pages) and takes it back."""

    def __init__(self, inner: FileBlockDevice) -> None:
        super().__init__(inner)
        self.loans: list[Any] = []

    def write_buffer(self, offset: int, length: int) -> Any:
        if length > 2 * MiB:
            return None                                  # the server then uses its own memory
        dev = self

        class Loan:
            def __init__(self) -> None:
                self.pages = [bytearray(min(4096, length - at)) for at in range(0, length, 4096)]
                self.views = [memoryview(p) for p in self.pages]
                self.released = self.submitted = 0

            def release(self) -> None:
                self.released += 1
        loan = Loan()
        with self._lock:
            dev.loans.append(loan)
        return loan

    def submit_write_buffer(self, offset: int, buffer: Any, fua: bool, done: Any) -> None:
        buffer.submitted += 1

        def op() -> None:
            os.pwrite(self._fd, b"".join(buffer.pages), offset)
            done(0)
        self._submit(op)


def test_write_payloads_received_into_the_devices_memory(tmp_path: Any, sock_dir: str) -> None:
    content = os.urandom(8 * MiB)
    devices: list[_LendingDevice] = []

    def wrap(inner: FileBlockDevice) -> _LendingDevice:
        devices.append(_LendingDevice(inner))
        return devices[0]
    with serving(tmp_path, sock_dir, content=content, device=wrap) as (srv, img, sock):
        c = RawClient(sock)
        c.handshake()
        model = bytearray(content)
        for h, length in enumerate((512, 4096, 65536 + 512, MiB, 3 * MiB, 4096)):
            data = os.urandom(length)
            off = (h * 1237 % 4) * MiB
            c.send(Cmd.WRITE, h, off, length, 0, data)
            model[off:off + length] = data
        while c.pending:
            assert c.reply()[1] == 0
        c.send(Cmd.READ, 99, 0, 8 * MiB)
        assert c.reply() == (99, 0, bytes(model))
        # A client gone half way through a payload: the memory lent for it goes back.
        c.sock.sendall(req(Cmd.WRITE, 100, 0, MiB) + bytes(MiB // 3))
        c.close()
        for _ in range(600):
            if srv.active_connections == 0:
                break
            threading.Event().wait(0.05)
        dev = devices[0]
        loans = dev.loans
        assert all(loan.released + loan.submitted == 1 for loan in loans), \
            [(loan.released, loan.submitted) for loan in loans]
        assert loans[-1].released == 1 and sum(loan.submitted for loan in loans) >= 2
        dev.close()
    with open(img, "rb") as f:
        assert f.read() == bytes(model)


def test_a_batch_that_keeps_buffers_is_never_joined_to_an_outer_one() -> None:
    """Nested batches join the outermost, whose end finishes their work -- but a device that keeps its
    read buffers only until its own batch ends gets a batch of its own, finished at its own end (the
    outer one's end could come after those buffers are freed), and the outer one is current again."""
    finished: list[tuple[str, list]] = []

    def finisher(name: str) -> Any:
        return lambda items: finished.append((name, items[:]))
    with completion_batch() as outer:
        assert outer is not None and not outer.keeps_buffers
        outer.items("conn", finisher("outer")).append(1)
        with completion_batch() as joined:
            assert joined is None and current_completion_batch() is outer
        with completion_batch(keeps_buffers=True) as own:
            assert own is not None and own is not outer and own.keeps_buffers
            assert current_completion_batch() is own
            own.items("conn", finisher("own")).append(2)
        assert finished == [("own", [2])]
        assert current_completion_batch() is outer
    assert finished == [("own", [2]), ("outer", [1])]
    assert current_completion_batch() is None
