"""The device channel: descriptors the toolstack hands a running guest, by devid."""

from __future__ import annotations

import os
import socket
import threading
import time

import msgpack

from xdom.domains.device_channel import DeviceChannel, offer_fd


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _pair() -> tuple[socket.socket, DeviceChannel]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return ours, DeviceChannel(theirs.detach())


def test_an_offered_descriptor_is_taken_by_devid() -> None:
    ours, chan = _pair()
    try:
        r, w = os.pipe()
        offer_fd(ours, "vif", 3, w)
        os.close(w)
        got = chan.take("vif", 3, 5.0)
        assert got is not None
        os.write(got, b"x")            # the same pipe, passed across
        assert os.read(r, 1) == b"x"
        os.close(got)
        os.close(r)
        assert chan.take("vif", 3, 0.05) is None     # taken once
    finally:
        chan.close()
        ours.close()


def test_take_waits_for_an_offer_that_comes_later() -> None:
    ours, chan = _pair()
    r, w = os.pipe()
    try:
        timer = threading.Timer(0.2, lambda: offer_fd(ours, "vif", 1, w))
        timer.start()
        t0 = time.monotonic()
        got = chan.take("vif", 1, 10.0)
        assert got is not None and time.monotonic() - t0 >= 0.1
        os.close(got)
        timer.join()
    finally:
        os.close(r)
        os.close(w)
        chan.close()
        ours.close()


def test_malformed_offers_are_dropped_with_their_descriptors_closed() -> None:
    ours, chan = _pair()
    try:
        before = _open_fds()
        for payload in (b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"vif": -1}),
                        msgpack.packb({"vif": True}), msgpack.packb({"vif": 1, "vbd": 2}),
                        msgpack.packb({"tap": []}), msgpack.packb({"tap": [1, -2]}), msgpack.packb({"tap": [1] * 5}),
                        msgpack.packb({"tap": [1, "x"]}), msgpack.packb({3: 1})):
            r, w = os.pipe()
            socket.send_fds(ours, [payload], [r])
            os.close(r)
            os.close(w)
        r, w = os.pipe()
        socket.send_fds(ours, [msgpack.packb({"vif": 2})], [r, w])   # two descriptors for one device
        os.close(r)
        os.close(w)
        ours.send(msgpack.packb({"vif": 4}))                          # no descriptor at all
        # a good offer after the bad ones still arrives: the reader is alive
        r, w = os.pipe()
        offer_fd(ours, "vif", 9, r)
        os.close(r)
        got = chan.take("vif", 9, 5.0)
        assert got is not None
        os.close(got)
        os.close(w)
        assert chan.take("vif", 2, 0.05) is None and chan.take("vif", 4, 0.05) is None
        assert _open_fds() - before == set()
    finally:
        chan.close()
        ours.close()


def test_an_untaken_offer_is_closed_when_replaced_or_when_the_channel_closes() -> None:
    ours, chan = _pair()
    before = _open_fds()
    r, w = os.pipe()
    offer_fd(ours, "vif", 5, w)
    offer_fd(ours, "vif", 5, w)           # a re-attach under the same devid replaces the first
    os.close(w)
    deadline = time.monotonic() + 5
    while len(_open_fds() - before) != 2 and time.monotonic() < deadline:   # r and the one kept offer
        time.sleep(0.01)
    assert len(_open_fds() - before) == 2
    chan.close()
    ours.close()
    assert os.read(r, 1) == b""           # every write end is closed now
    os.close(r)


def test_backends_key_descriptors_by_frontend_and_devid() -> None:
    ours, chan = _pair()
    try:
        r, w = os.pipe()
        offer_fd(ours, "tap", (7, 1), r)
        os.close(r)
        assert chan.take("tap", (7, 0), 0.05) is None
        got = chan.take("tap", (7, 1), 5.0)
        assert got is not None
        os.close(got)
        os.close(w)
    finally:
        chan.close()
        ours.close()


def test_take_returns_none_once_the_toolstack_hangs_up() -> None:
    ours, chan = _pair()
    ours.close()
    t0 = time.monotonic()
    assert chan.take("vif", 0, 10.0) is None
    assert time.monotonic() - t0 < 5
    chan.close()
