"""vhost-user back ends against a hostile VMM: real socket, real descriptors, the production I/O shell.

The sans-IO tests (test_vhost_user_backend.py, _wire.py) drive the core
through a fake shell whose "fds" are numbers.  Here a hostile front end
(``vhost_user_hostile_frontend.FrontEnd``) talks to ``VhostUserBlkExport``
-- codec, core, ``server.py``'s recvmsg/mmap/epoll/eventfd shell and the
virtio-blk data path, as the guest domain runs them -- over a unix socket,
with memfds, eventfds, pipes and files as SCM_RIGHTS, and writes the VM's
rings in a memfd both sides map.  What must hold: a bad request is refused
(REPLY_ACK 1) or the connection dropped, a ring the guest breaks signals its
err eventfd and stops while the others serve, every descriptor that arrives
is closed or kept (counted in /proc/self/fd) and nothing refused is mapped
(/proc/self/maps); the loop thread never dies, never spins, never blocks.

Six were holes when written (each failed, with the reason, as a strict
xfail until its fix): memory shorter than its mapping, or not sealed
against shrinking, was a SIGBUS that killed the guest domain; a kick fd
epoll refuses ended the loop, and one that hung up spun it; a call fd that
could not be written ended the loop or blocked it; an inflight area
replaced under a running ring ended it; a front end that did not read its
replies wedged it.  A kick fd that one write keeps readable (a semaphore
eventfd, a pipe, a socket) had its ring processed on every loop turn until
the tenth session.  The memory tests run the back end as a separate
process, so that a SIGBUS fails the test instead of killing the run.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
from vhost_user_hostile_frontend import (
    GUEST_SEALS,
    GUEST_SIZE,
    NUM,
    PROTO,
    S_OK,
    T_FLUSH,
    T_IN,
    UVA,
    FrontEnd,
    Guest,
    RingFds,
    ServedDisk,
    fd_targets,
    mapped,
    mappings,
    memfd,
    negotiate,
    start_ring,
    wait_for,
)

from xdom.domains.vhost_user import wire
from xdom.domains.vhost_user.inflight import area_size
from xdom.domains.vhost_user.memory import MemoryRegion
from xdom.domains.vhost_user.spec import ProtocolFeature as PF
from xdom.domains.vhost_user.spec import Request as R
from xdom.domains.vhost_user.virtqueue import VIRTQ_DESC_F_NEXT

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def sockdir(run_dir: str) -> str:
    """A short directory for the sockets (a unix socket's path is at most 107 bytes): conftest's run_dir."""
    return run_dir


class Setup:
    """A served disk, the VM's memory and a connected, negotiated front end; all released by ``finish``."""

    def __init__(self, sockdir: str, *, proto: int = PROTO, queues: int = 2, table: bool = True) -> None:
        self.served = ServedDisk(os.path.join(sockdir, "disk.sock"), num_queues=queues)
        self.guest = Guest()
        self.fe = FrontEnd(self.served.path)
        self.rings: list[RingFds] = []
        negotiate(self.fe, self.guest if table else None, proto=proto)

    def ring(self, index: int, *, kick: int | None = None, call: int | None = None) -> RingFds:
        fds = start_ring(self.fe, self.guest, index, kick=kick, call=call)
        self.rings.append(fds)
        return fds

    def serve_one(self, ring: RingFds, index: int, head: int, kind: int = T_FLUSH, timeout: float = 2.0) -> int | None:
        """A request on ring ``index``, kicked: its status, or None if nothing came back."""
        status = self.guest.blk_request(index, head, kind, data_len=512)
        ring.do_kick()
        if not wait_for(lambda: self.guest.mm[status] != 0xFF, timeout):
            return None
        return self.guest.mm[status]

    def finish(self) -> None:
        self.fe.close()
        try:
            assert self.served.stop(5), "the vhost-user loop did not stop"
        finally:
            for r in self.rings:
                r.close()
            self.guest.close()


@pytest.fixture
def setup(sockdir: str) -> Iterator[Setup]:
    s = Setup(sockdir)
    try:
        yield s
    finally:
        s.finish()


# --- the guest breaks one ring: that ring stops and says so, the others serve ------------------------

BREAKERS = {
    "a looping chain": lambda g: (g.desc(0, 0, 0x40000, 1, VIRTQ_DESC_F_NEXT, 1),
                                  g.desc(0, 1, 0x40000, 1, VIRTQ_DESC_F_NEXT, 0), g.offer(0, 0)),
    "an avail index a ring and one ahead": lambda g: struct.pack_into("<H", g.mm, g.avail_gpa(0) + 2,
                                                                      g.avail_idx[0] + NUM + 1),
    "a head equal to the ring size": lambda g: g.offer(0, NUM),
    "a buffer past the end of guest memory": lambda g: (g.desc(0, 0, GUEST_SIZE - 8, 16), g.offer(0, 0)),
}


@pytest.mark.parametrize("how", list(BREAKERS))
def test_a_broken_ring_signals_its_err_fd_and_the_other_rings_keep_serving(setup: Setup, how: str) -> None:
    r0, r1 = setup.ring(0), setup.ring(1)
    assert setup.serve_one(r0, 0, 4) == S_OK
    BREAKERS[how](setup.guest)
    r0.do_kick()
    assert wait_for(lambda: RingFds.count(r0.err) == 1), "the err eventfd was not signalled"
    # The broken ring is inert: a well-formed request after it is never served, no used entry appears.
    used = setup.guest.used_idx(0)
    assert setup.serve_one(r0, 0, 2, timeout=0.3) is None and setup.guest.used_idx(0) == used
    assert RingFds.count(r0.err) == 0                         # signalled once, not at every kick
    # The other ring and the connection go on.
    assert setup.serve_one(r1, 1, 0, T_IN) == S_OK and RingFds.count(r1.call) >= 1
    assert setup.fe.alive() and setup.served.loop_alive


# --- descriptors the VMM passes as eventfds that are not, or that cannot be signalled ------------------

def test_kick_fd_that_is_a_regular_file(setup: Setup) -> None:
    with tempfile.TemporaryFile() as f:
        setup.ring(0, kick=f.fileno())             # refused, or accepted and never a kick: either is fine
    assert setup.served.loop_alive, "the vhost-user loop died"
    assert setup.fe.alive(), "the back end does not answer"
    assert setup.serve_one(setup.ring(1), 1, 0) == S_OK


def _count_processing(setup: Setup) -> collections.Counter[int]:
    """How often each ring is processed from now on (the device's ``process`` wrapped)."""
    handler = setup.served.export.handler
    calls = collections.Counter[int]()
    real = handler.process

    def counting(index: int, queue: object) -> None:
        calls[index] += 1
        real(index, queue)                  # type: ignore[arg-type]
    handler.process = counting              # type: ignore[method-assign]
    return calls


def test_kick_fd_that_is_a_hung_up_pipe(setup: Setup) -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        setup.ring(0, kick=r)
    finally:
        os.close(r)
    calls = _count_processing(setup)
    time.sleep(0.3)
    assert setup.fe.alive()
    # An idle ring with a kick fd is processed when kicked; nobody kicked it.
    assert calls[0] <= 5, f"ring processed {calls[0]} times in 0.3 s with no kick"


def _semaphore_eventfd() -> tuple[int, int]:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
    return fd, fd


def _socketpair() -> tuple[int, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a.detach(), b.detach()


def _pipe() -> tuple[int, int]:
    return os.pipe()


STAYS_READABLE = {"eventfd in semaphore mode": _semaphore_eventfd, "pipe": _pipe, "socket": _socketpair}


@pytest.mark.parametrize("kind", list(STAYS_READABLE))
def test_kick_fd_that_one_write_keeps_readable_is_refused(setup: Setup, kind: str) -> None:
    """One write of the VMM's must not buy a ring processed on every loop turn for ever: a semaphore
    eventfd given 2**63 reads 1 at a time, a pipe or a socket 8 bytes at a time."""
    kick, writer = STAYS_READABLE[kind]()
    try:
        setup.ring(0, kick=kick)
        calls = _count_processing(setup)
        if writer == kick:
            os.eventfd_write(writer, 1 << 63)
        else:
            os.set_blocking(writer, False)
            os.write(writer, bytes(60000))
        time.sleep(0.3)
        assert calls[0] <= 5, f"ring processed {calls[0]} times in 0.3 s after one write"
    finally:
        os.close(kick)
        if writer != kick:
            os.close(writer)
    assert setup.fe.alive() and setup.served.loop_alive
    assert setup.serve_one(setup.ring(1), 1, 0) == S_OK
    # The ring comes back with a real kick eventfd, pending requests and all.
    again = RingFds()
    try:
        assert setup.fe.ack(R.SET_VRING_KICK, wire.pack_vring_file(0), (again.kick,)) == 0
        assert setup.serve_one(again, 0, 1) == S_OK
    finally:
        again.close()


def _readonly_file() -> int:
    fd, path = tempfile.mkstemp()
    os.close(fd)
    ro = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.unlink(path)
    return ro


def _eventfd_at_its_limit() -> int:
    """A *blocking* eventfd one short of its maximum count: a write of 1 blocks until someone reads it."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)
    return efd


@pytest.mark.parametrize("kind", ["read-only file", "blocking eventfd at its limit"])
def test_call_fd_that_cannot_be_signalled(setup: Setup, kind: str) -> None:
    call = _readonly_file() if kind == "read-only file" else _eventfd_at_its_limit()
    try:
        r0 = setup.ring(0, call=call)
        setup.serve_one(r0, 0, 0)                  # served; the signal is what goes wrong
        ok = setup.fe.alive() and setup.served.loop_alive
        answered = setup.serve_one(setup.ring(1), 1, 0) == S_OK if ok else False
    finally:
        if kind != "read-only file":
            os.eventfd_read(call)                  # let a blocked loop go, so the test can end
        os.close(call)
    assert ok, "the vhost-user loop died or does not answer"
    assert answered, "the other ring is not served"


# --- the inflight area swapped under a running ring -----------------------------------------------------

def test_inflight_area_replaced_under_a_running_ring(sockdir: str) -> None:
    s = Setup(sockdir, proto=PROTO | (1 << PF.INFLIGHT_SHMFD))
    try:
        fe = s.fe
        fe.send(R.GET_INFLIGHT_FD, wire.pack_inflight(0, 0, 2, NUM))
        ev = fe.reply()
        assert ev is not None and len(ev.fds) == 1
        size = struct.unpack("=QQHHxxxx", ev.payload.data)[0]      # type: ignore[union-attr]
        assert fe.ack(R.SET_INFLIGHT_FD, wire.pack_inflight(size, 0, 2, NUM), ev.fds) == 0
        os.close(ev.fds[0])
        r0 = s.ring(0)
        assert s.serve_one(r0, 0, 0) == S_OK
        # The VMM asks for a new area while ring 0 runs (legal bytes; QEMU does it on every start).
        fe.send(R.GET_INFLIGHT_FD, wire.pack_inflight(0, 0, 2, NUM))
        ev = fe.reply()
        assert ev is not None
        for fd in ev.fds:
            os.close(fd)
        status = s.serve_one(r0, 0, 2, timeout=1.0)
        alive = s.served.loop_alive and fe.alive()
    finally:
        s.finish()
    assert alive, "the vhost-user loop died"
    assert status is not None, "the request after the swap was neither served nor its ring marked broken"


# --- a VMM that does not read its replies ---------------------------------------------------------------

def test_a_front_end_that_never_reads_its_replies_cannot_wedge_the_loop(sockdir: str) -> None:
    served = ServedDisk(os.path.join(sockdir, "disk.sock"))
    fe = FrontEnd(served.path)
    server_log = logging.getLogger("xdom.domains.vhost_user.server")
    level = server_log.level
    server_log.setLevel(logging.ERROR)             # each reply that cannot go after the close is a warning
    stopped = False
    try:
        sndbuf = fe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        fe.sock.sendall(wire.encode_request(R.GET_FEATURES) * max(1000, sndbuf // 100))
        time.sleep(0.3)
        stopped = served.stop(2.0)
    finally:
        fe.close()                                 # the peer goes: a blocked sendmsg fails, the loop ends
        try:
            if not stopped:
                assert served.stop(5.0)
        finally:
            server_log.setLevel(level)
    assert stopped, "stop() could not end the loop: it is blocked writing replies nobody reads"


# --- the memory table: everything refused is closed and never mapped ----------------------------------------

def _region(gpa: int, size: int, uva: int, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva, mmap_offset=offset)


def _sealed(name: str) -> int:
    fd = memfd(name, 0x10000, sealing=True)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    return fd


#: Tables the core refuses before anything is mapped: the table in place stays.
BAD_TABLES: dict[str, list[MemoryRegion]] = {
    "a region of size 0": [_region(0, 0, UVA)],
    "regions overlapping in guest memory": [_region(0, 0x10000, UVA), _region(0x8000, 0x10000, UVA + 0x100000)],
    "regions overlapping in the VMM's addresses": [_region(0, 0x10000, UVA),
                                                   _region(0x100000, 0x10000, UVA + 0x8000)],
    "a region wrapping 2**64": [_region((1 << 64) - 0x1000, 0x10000, UVA)],
    "a region of 2 TiB": [_region(0, 2 << 40, UVA)],
    "an mmap offset of 2 TiB": [_region(0, 0x10000, UVA, 2 << 40)],
}
#: Descriptors the shell cannot map shared and writable.
UNMAPPABLE = {
    "a memfd sealed against writes": _sealed,
    "an eventfd for memory": lambda name: os.eventfd(0, os.EFD_CLOEXEC),
    "a read-only file": lambda name: _readonly_file(),
}


def _refused_and_gone(what: str, fe: FrontEnd, request: int, payload: bytes, fds: list[int],
                      names: list[str]) -> None:
    try:
        assert fe.ack(request, payload, fds) == 1, f"{what}: not refused"
    finally:
        for fd in fds:
            os.close(fd)
    assert not any(mapped(name) for name in names), f"{what}: mapped"
    assert not any(name in t for t in fd_targets() for name in names), f"{what}: descriptor kept"


def test_memory_table_attacks_are_refused_map_nothing_and_close_every_fd(setup: Setup) -> None:
    fe = setup.fe
    r0 = setup.ring(0)
    assert setup.serve_one(r0, 0, 0, T_IN) == S_OK
    for n, (what, regions) in enumerate(BAD_TABLES.items()):
        names = [f"xvu-bad-{n}-{i}" for i in range(len(regions))]
        _refused_and_gone(what, fe, R.SET_MEM_TABLE, wire.pack_memory_table(regions),
                          [memfd(name, 0x20000) for name in names], names)
    # The table in place stayed, and the running ring with it.
    assert setup.serve_one(r0, 0, 2, T_IN) == S_OK and RingFds.count(r0.err) == 0
    for what, make in UNMAPPABLE.items():
        _refused_and_gone(what, fe, R.SET_MEM_TABLE, wire.pack_memory_table([_region(0, 0x10000, UVA)]),
                          [make("xvu-unmappable")], ["xvu-unmappable"])
        _refused_and_gone(what, fe, R.ADD_MEM_REG, wire.pack_single_region(_region(0x2000_0000, 0x10000, UVA << 1)),
                          [make("xvu-unmappable")], ["xvu-unmappable"])
    # (A table the shell could not map has replaced the old one, as libvhost-user's would: a front end
    # that goes on after the refusal sends a table again.)
    assert fe.ack(R.SET_MEM_TABLE, wire.pack_memory_table([setup.guest.region()]), (setup.guest.fd,)) == 0
    # ADD_MEM_REG past the table's 32 slots (the guest's region is one of them).
    added = []
    for i in range(32):
        fd = memfd(f"xvu-slot-{i}", 0x1000)
        region = _region(0x10000000 + 0x10000 * i, 0x1000, UVA + 0x10000000 + 0x10000 * i)
        try:
            got = fe.ack(R.ADD_MEM_REG, wire.pack_single_region(region), (fd,))
        finally:
            os.close(fd)
        assert got == (0 if i < 31 else 1), (i, got)
        if got == 0:
            added.append(region)
    assert mapped("xvu-slot-30") and not mapped("xvu-slot-31")
    assert not any("xvu-slot-" in t for t in fd_targets())        # mapped regions keep no descriptor
    for region in added:
        assert fe.ack(R.REM_MEM_REG, wire.pack_single_region(region)) == 0
    assert not any(mapped(f"xvu-slot-{i}") for i in range(32))
    # Through all of it the connection stayed up; a ring started on the table in place serves.
    assert setup.serve_one(setup.ring(1), 1, 0, T_IN) == S_OK


# --- descriptors attached where they do not belong ------------------------------------------------------

def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _send_and_close(fe: FrontEnd, data: bytes, fds: list[int]) -> None:
    try:
        fe.send_raw(data, fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_descriptors_on_messages_that_take_none_are_closed(sockdir: str) -> None:
    served = ServedDisk(os.path.join(sockdir, "disk.sock"))
    guest = Guest()
    try:
        baseline = collections.Counter(fd_targets())

        def back_to_baseline() -> None:
            assert wait_for(lambda: collections.Counter(fd_targets()) == baseline), \
                collections.Counter(fd_targets()) - baseline
            assert not any(mapped(f"xvu-leak-{i}") for i in range(8))

        # 1. Refused requests with descriptors, on a connection that goes on; then fds on GET_FEATURES.
        fe = FrontEnd(served.path)
        negotiate(fe, None)
        for request, payload, n in [(R.SET_LOG_FD, b"", 1), (R.SET_LOG_BASE, wire.pack_log_area(4096, 0), 1),
                                    (R.SET_BACKEND_REQ_FD, b"", 1), (200, b"xyz", 3),
                                    (R.SET_INFLIGHT_FD, wire.pack_inflight(4096, 0, 1, 8), 1),
                                    (R.REM_MEM_REG, wire.pack_single_region(_region(0, 0x1000, UVA)), 1)]:
            fds = _eventfds(n)
            try:
                assert fe.ack(request, payload, fds) == 1, request
            finally:
                for fd in fds:
                    os.close(fd)
        for i in range(8):                       # a table replaced again and again: only the last one stays
            fd = memfd(f"xvu-leak-{i}", GUEST_SIZE)
            try:
                assert fe.ack(R.SET_MEM_TABLE, wire.pack_memory_table([guest.region()]), (fd,)) == 0
            finally:
                os.close(fd)
        assert mapped("xvu-leak-7") and not mapped("xvu-leak-6")
        for _ in range(50):                      # a call fd replaced again and again
            fds = _eventfds(1)
            try:
                assert fe.ack(R.SET_VRING_CALL, wire.pack_vring_file(0), fds) == 0
            finally:
                os.close(fds[0])
        assert sum(t == "anon_inode:[eventfd]" for t in fd_targets()) == baseline["anon_inode:[eventfd]"] + 1
        _send_and_close(fe, wire.encode_request(R.GET_FEATURES), _eventfds(2))
        assert fe.closed_by_peer(), "fds on GET_FEATURES: the connection should be dropped"
        fe.close()
        back_to_baseline()
        # 2. More descriptors in one message than any may carry (the kernel truncates them).
        fe = FrontEnd(served.path)
        _send_and_close(fe, wire.encode_request(R.SET_VRING_CALL, wire.pack_vring_file(0)), _eventfds(12))
        assert fe.closed_by_peer()
        fe.close()
        back_to_baseline()
        # 3. A message announcing more payload than comes, with descriptors, then the end of the stream.
        fe = FrontEnd(served.path)
        _send_and_close(fe, struct.pack("=III", R.SET_MEM_TABLE, wire.VERSION, 100) + bytes(10), _eventfds(2))
        fe.sock.shutdown(socket.SHUT_WR)
        assert fe.closed_by_peer()
        fe.close()
        back_to_baseline()
        # 4. A running ring, its fds and the memory table, and the front end just goes away.
        ours = mappings("xvu-guest")
        fe = FrontEnd(served.path)
        negotiate(fe, guest)
        ring = start_ring(fe, guest, 0)
        assert mappings("xvu-guest") == ours + 1
        ring.close()
        fe.close()
        back_to_baseline()
        assert wait_for(lambda: mappings("xvu-guest") == ours)
        assert served.loop_alive
    finally:
        guest.close()
        assert served.stop(5)


# --- ring geometry from the VMM ------------------------------------------------------------------------------

def test_ring_geometry_attacks_are_refused(sockdir: str) -> None:
    s = Setup(sockdir, table=False)
    try:
        fe, g = s.fe, s.guest
        # Two regions contiguous in the VMM's addresses but not in guest memory (both slices of one memfd).
        low = _region(0, GUEST_SIZE // 2, UVA)
        high = _region(0x4000_0000, GUEST_SIZE // 2, UVA + GUEST_SIZE // 2, GUEST_SIZE // 2)
        assert fe.ack(R.SET_MEM_TABLE, wire.pack_memory_table([low, high]), (g.fd, g.fd)) == 0
        for num in (0, 3, 48, 2048, 65536, 1 << 31, (1 << 32) - 1):
            assert fe.ack(R.SET_VRING_NUM, wire.pack_vring_state(0, num)) == 1, num
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            # The ring never got a size: it cannot start, and a kick serves nothing.
            assert fe.ack(R.SET_VRING_KICK, wire.pack_vring_file(0), (kick,)) == 1
            g.blk_request(0, 0, T_FLUSH)
            os.eventfd_write(kick, 1)
            time.sleep(0.1)
            assert g.used_idx(0) == 0
        finally:
            os.close(kick)
        assert fe.ack(R.SET_VRING_NUM, wire.pack_vring_state(0, NUM)) == 0
        split = UVA + GUEST_SIZE // 2
        for desc, avail, used in [(split - 64, UVA + 0x2000, UVA + 0x3000),       # the table straddles
                                  (UVA + 0x1000, split - 10, UVA + 0x3000),       # the avail ring straddles
                                  (UVA + 0x1000, UVA + 0x2000, split - 40),       # the used ring straddles
                                  (UVA + 0x1000, UVA + 0x2000, UVA + GUEST_SIZE),  # in no region
                                  ((1 << 64) - 64, UVA + 0x2000, UVA + 0x3000)]:  # wraps the address space
            assert fe.ack(R.SET_VRING_ADDR, wire.pack_vring_addr(0, 0, desc, used, avail)) == 1, hex(desc)
        high_ring = (split + 0x1000, split + 0x3000, split + 0x2000)          # all three in the high region
        assert fe.ack(R.SET_VRING_ADDR, wire.pack_vring_addr(0, 0, *high_ring)) == 0
        assert fe.alive() and s.served.loop_alive
    finally:
        s.finish()


# --- memory the VMM's fd does not back: the back end as a separate process ------------------------------------

def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


SHORT_MEMORY = ["region larger than its fd", "mmap offset past the fd's end", "fd shrunk after it was mapped",
                "inflight fd shorter than its area"]


@pytest.mark.parametrize("how", SHORT_MEMORY)
def test_memory_past_the_end_of_its_fd_is_no_crash(sockdir: str, how: str) -> None:
    path = os.path.join(sockdir, "disk.sock")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "vhost_user_hostile_frontend.py"), path],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=_no_core)
    # Unsealed where the test shrinks it; sealed after that where only its size is to be wrong.
    guest = Guest(sealed=how not in ("region larger than its fd", "fd shrunk after it was mapped"))
    fe = None
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        fe = FrontEnd(path)
        proto = PROTO | ((1 << PF.INFLIGHT_SHMFD) if how.startswith("inflight") else 0)
        negotiate(fe, None, proto=proto)
        region, fd = guest.region(), guest.fd
        if how == "region larger than its fd":
            os.ftruncate(guest.fd, 0x2000)         # the rings' used part (0x3000) is past the end
            fcntl.fcntl(guest.fd, fcntl.F_ADD_SEALS, GUEST_SEALS)
        elif how == "mmap offset past the fd's end":
            region = _region(0, GUEST_SIZE, UVA, GUEST_SIZE)
        accepted = fe.ack(R.SET_MEM_TABLE, wire.pack_memory_table([region]), (fd,)) == 0
        if how.startswith("inflight"):
            empty = memfd("xvu-inflight", 0)
            try:
                fe.ack(R.SET_INFLIGHT_FD, wire.pack_inflight(area_size(1, NUM), 0, 1, NUM), (empty,))
            finally:
                os.close(empty)
        try:
            ring = start_ring(fe, guest, 0, check=False)
            if how == "fd shrunk after it was mapped" and accepted:
                status = guest.blk_request(0, 0, T_FLUSH)
                ring.do_kick()
                assert wait_for(lambda: guest.mm[status] == S_OK)
                os.ftruncate(guest.fd, 0)
                ring.do_kick()
            ring.close()
        except OSError as e:                       # the back end went away under the set-up
            assert e.errno in (errno.EPIPE, errno.ECONNRESET), e
        time.sleep(0.2)
        fe.close()
        fe = None
        assert proc.poll() is None, f"the back end died: exit status {proc.returncode}"
        again = FrontEnd(path)                     # ... and serves the next front end
        try:
            assert again.alive()
        finally:
            again.close()
    finally:
        if fe is not None:
            fe.close()
        guest.close()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
