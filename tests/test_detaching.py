"""Detaches followed from the supervisor's loop (deploy/detaching.py), on a real xenstored.

The loop must never wait for a backend: a detach is asked, then looked at
when due; it ends when the backend says Closed (clean) or at its deadline
(not clean), and either way the device's nodes go and ``finish`` runs once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from xs_fixtures import introduce

from xdom.deploy.detaching import POLL, Detach, Detaches
from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.deploy.xsdevice import ask_to_close
from xdom.domains.xenbus import XenbusState
from xdom.domains.xenstore import XenstoreClient

BE, FE, DEVID = 3, 7, 51712
BE_PATH = f"/local/domain/{BE}/backend/vbd/{FE}/{DEVID}"
FE_PATH = f"/local/domain/{FE}/device/vbd/{DEVID}"


def _opener(xs: XenstoreClient):
    @contextlib.contextmanager
    def open_it() -> Iterator[XenstoreClient]:
        yield xs
    return open_it


def _detach(finished: list[bool], deadline: float) -> Detach:
    return Detach("g1", "xvda", "vbd", BE, FE, DEVID, deadline, finished.append)


def test_a_detach_ends_when_the_backend_closes_and_its_nodes_go(xs: XenstoreClient) -> None:
    introduce(xs, BE, FE)
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    assert ask_to_close(xs, "vbd", BE, FE, DEVID)
    assert xs.read(f"{BE_PATH}/state") == str(int(XenbusState.Closing)).encode()
    finished: list[bool] = []
    detaches = Detaches()
    detaches.add(_detach(finished, deadline=100.0))
    detaches.poll(1.0, _opener(xs))                       # the backend has not closed yet: nothing ends
    assert finished == [] and detaches.pending("g1", "xvda") and detaches.of("g1") == (["xvda"], {})
    detaches.poll(1.0 + POLL / 2, _opener(xs))            # not due yet: not even looked at
    xs.write(f"{BE_PATH}/state", str(int(XenbusState.Closed)))
    detaches.poll(1.0 + POLL, _opener(xs))
    assert finished == [True] and not xs.exists(BE_PATH) and not xs.exists(FE_PATH)
    assert detaches.of("g1") == ([], {"xvda": True}) and detaches.due() is None


def test_a_backend_that_never_closes_costs_the_deadline_not_the_loop(xs: XenstoreClient) -> None:
    introduce(xs, BE, FE)
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    ask_to_close(xs, "vbd", BE, FE, DEVID)
    finished: list[bool] = []
    detaches = Detaches()
    detaches.add(_detach(finished, deadline=5.0))
    for now in (1.0, 2.0, 4.9):
        detaches.poll(now, _opener(xs))
        assert finished == []
    detaches.poll(5.0, _opener(xs))
    assert finished == [False] and not xs.exists(BE_PATH) and detaches.of("g1") == ([], {"xvda": False})


def test_a_xenstored_that_fails_ends_a_detach_at_its_deadline(xs: XenstoreClient) -> None:
    finished: list[bool] = []
    detaches = Detaches()
    detaches.add(_detach(finished, deadline=5.0))

    @contextlib.contextmanager
    def broken() -> Iterator[XenstoreClient]:
        raise OSError("xenstored is gone")
        yield xs                                            # (never reached)
    detaches.poll(1.0, broken)
    assert finished == []
    detaches.poll(5.0, broken)
    assert finished == [False] and detaches.due() is None
