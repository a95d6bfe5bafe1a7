"""A vbd's xenstore nodes, as deploy/vbd.py writes them (libxl's ``libxl__device_disk_add`` layout).

A standalone xenstored; everything is read back through XenstoreClient:
values, permissions (backend directory owned by the backend and readable by
the frontend, the frontend's the other way round, the directories above
them dom0's), a live frontend kept across a backend re-add, and libxl's
detach handshake against a backend played by hand.
"""

from __future__ import annotations

import threading

import pytest
from xs_fixtures import Xenstored, introduce, nodes

from xdom.deploy.vbd import VbdConfig, add_vbd, remove_vbd
from xdom.domains.xenbus import XenbusState, read_state, switch_state
from xdom.domains.xenstore import XenstoreClient

pytestmark = pytest.mark.timeout(60)

BE, FE, DEVID = 3, 7, 51712          # xvda
BE_PATH = f"/local/domain/{BE}/backend/vbd/{FE}/{DEVID}"
FE_PATH = f"/local/domain/{FE}/device/vbd/{DEVID}"


@pytest.fixture
def xs(xs: XenstoreClient) -> XenstoreClient:
    """The conftest client, with the backend and frontend domains introduced: a xenstored
    without a hypervisor knows only introduced domains, and refuses (ENOENT) permissions
    owned by any other, as Xen's does (XSA-322)."""
    introduce(xs, BE, FE)
    return xs


def test_add_vbd_writes_libxl_nodes(xs: XenstoreClient) -> None:
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img", export="/run/xdom/g1-xvda.sock"))
    assert nodes(xs, BE_PATH) == {
        "frontend": FE_PATH, "frontend-id": str(FE), "online": "1", "removable": "0", "bootable": "1",
        "state": str(int(XenbusState.Initialising)), "dev": "xvda", "type": "phy", "mode": "w",
        "device-type": "disk", "discard-enable": "1", "params": "/srv/g1.img",
    }
    assert nodes(xs, FE_PATH) == {
        "backend": BE_PATH, "backend-id": str(BE), "state": str(int(XenbusState.Initialising)),
        "virtual-device": str(DEVID), "device-type": "disk", "xdom-export": "/run/xdom/g1-xvda.sock",
    }


def test_read_only_and_sector_size(xs: XenstoreClient) -> None:
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/ro.img", read_only=True, logical_sector_size=4096))
    be = nodes(xs, BE_PATH)
    assert be["mode"] == "r" and be["discard-enable"] == "0" and be["logical-sector-size"] == "4096"
    assert "xdom-export" not in nodes(xs, FE_PATH)


def test_optional_nodes_are_left_out(xs: XenstoreClient) -> None:
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    assert "logical-sector-size" not in nodes(xs, BE_PATH)
    assert "xdom-export" not in nodes(xs, FE_PATH)


def test_permissions(xs: XenstoreClient) -> None:
    """Backend nodes: the backend's, the frontend may read; frontend nodes: the other way round; nobody else."""
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    for key in [""] + xs.directory(BE_PATH):
        assert xs.get_perms(f"{BE_PATH}/{key}".rstrip("/")) == [f"n{BE}", f"r{FE}"], key
    for key in [""] + xs.directory(FE_PATH):
        assert xs.get_perms(f"{FE_PATH}/{key}".rstrip("/")) == [f"n{FE}", f"r{BE}"], key
    for d in (f"/local/domain/{BE}/backend", f"/local/domain/{BE}/backend/vbd", f"/local/domain/{BE}/backend/vbd/{FE}"):
        assert xs.get_perms(d) == ["n0", f"r{BE}"], d
    assert xs.get_perms(f"/local/domain/{FE}/device/vbd") == ["n0", f"r{FE}"]


def test_re_add_keeps_a_live_frontend(xs: XenstoreClient) -> None:
    """A restarted backend gets fresh nodes; the connected frontend's rings and state stay, with perms set anew."""
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    xs.write(f"{FE_PATH}/ring-ref", "8")              # written as the frontend would, but as dom0:
    xs.write(f"{FE_PATH}/protocol", "x86_64-abi")
    xs.write(f"{FE_PATH}/state", str(int(XenbusState.Connected)))
    xs.write(f"{BE_PATH}/state", str(int(XenbusState.Connected)))
    xs.write(f"{BE_PATH}/sectors", "16384")
    xs.set_perms(f"{BE_PATH}/online", ["n0"])

    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/other.img", export="/run/other.sock"))
    fe = nodes(xs, FE_PATH)
    assert fe["ring-ref"] == "8" and fe["protocol"] == "x86_64-abi"
    assert fe["state"] == str(int(XenbusState.Connected))
    assert "xdom-export" not in fe                     # the frontend's nodes are not rewritten
    assert read_state(xs, BE_PATH) == XenbusState.Initialising
    assert xs.read(f"{BE_PATH}/params") == b"/srv/other.img"
    for key in xs.directory(FE_PATH):
        assert xs.get_perms(f"{FE_PATH}/{key}") == [f"n{FE}", f"r{BE}"], key
    for key in xs.directory(BE_PATH):
        assert xs.get_perms(f"{BE_PATH}/{key}") == [f"n{BE}", f"r{FE}"], key


def test_re_add_rewrites_a_frontend_without_state(xs: XenstoreClient) -> None:
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    xs.rm(f"{FE_PATH}/state")
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img", export="/run/x.sock"))
    assert nodes(xs, FE_PATH)["xdom-export"] == "/run/x.sock"
    assert read_state(xs, FE_PATH) == XenbusState.Initialising


def test_remove_vbd_with_a_backend(xenstored: Xenstored, xs: XenstoreClient) -> None:
    """A backend played by hand answers Closing with Closed, as blkback does once the frontend let go."""
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    seen: list[tuple[XenbusState, bytes | None]] = []
    answered = threading.Event()
    with XenstoreClient.unix(xenstored.socket_path) as backend:
        def changed(path: str, token: str) -> None:
            state = read_state(backend, BE_PATH)
            if state == XenbusState.Closing:
                seen.append((state, backend.read(f"{BE_PATH}/online")))
                switch_state(backend, BE_PATH, XenbusState.Closed)
                answered.set()
        backend.watch(f"{BE_PATH}/state", "blkback", changed)
        assert remove_vbd(xs, BE, FE, DEVID, timeout=30)
        assert answered.is_set()
        backend.unwatch(f"{BE_PATH}/state", "blkback")
    assert seen and seen[0] == (XenbusState.Closing, b"0")
    assert not xs.exists(BE_PATH) and not xs.exists(FE_PATH)
    assert xs.exists(f"/local/domain/{BE}/backend/vbd/{FE}")      # only the device's own directories go
    assert xs.exists(f"/local/domain/{FE}/device/vbd")


def test_remove_vbd_without_a_backend_gives_up_and_cleans_up(xs: XenstoreClient) -> None:
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    assert remove_vbd(xs, BE, FE, DEVID, timeout=0.3) is False
    assert not xs.exists(BE_PATH) and not xs.exists(FE_PATH)


def test_remove_vbd_of_a_missing_device_creates_nothing(xs: XenstoreClient) -> None:
    assert remove_vbd(xs, BE, FE, DEVID + 16, timeout=0.2) is False
    assert not xs.exists(f"/local/domain/{BE}/backend/vbd/{FE}/{DEVID + 16}")
    assert not xs.exists(f"/local/domain/{FE}/device/vbd/{DEVID + 16}")


def test_switch_state_publishes_nodes_with_the_state_and_nothing_once_the_device_is_gone(
        xs: XenstoreClient) -> None:
    """A driver's features (or a disk's size) go in the transaction that writes its state, sent in one
    batch with the state's existence check (a restarted backend's handshake is its guests' stall); once
    the toolstack removed the device, nothing is written back, not even a node of the batch."""
    from xdom.domains.xenbus import read_nodes
    add_vbd(xs, VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img"))
    assert switch_state(xs, BE_PATH, XenbusState.InitWait, {"feature-persistent": 1, "max-ring-page-order": 4})
    got = read_nodes(xs, BE_PATH, ["state", "feature-persistent", "max-ring-page-order", "absent"])
    assert got == {"state": b"2", "feature-persistent": b"1", "max-ring-page-order": b"4", "absent": None}
    xs.rm(BE_PATH)
    assert not switch_state(xs, BE_PATH, XenbusState.Connected, {"sectors": 8})
    assert not xs.exists(BE_PATH)


def test_pipelined_requests_are_answered_each_in_its_place(xs: XenstoreClient) -> None:
    """Requests sent together get their own replies, errors included, and a transaction's batch of writes
    commits together."""
    from xdom.domains.abi.xs_wire import XenstoreError, XsType
    xs.write("/a", "1")
    replies = xs.requests([(XsType.XS_READ, b"/a\0"), (XsType.XS_READ, b"/missing\0"), (XsType.XS_WRITE, b"/b\0" + b"2"),
                           (XsType.XS_READ, b"/b\0")])
    assert replies[0] == b"1" and isinstance(replies[1], XenstoreError) and replies[1].name == "ENOENT"
    assert replies[3] == b"2"
    assert xs.read_many(["/a", "/missing", "/b"]) == [b"1", None, b"2"]
    xs.transaction(lambda tx: xs.write_many({"/c": "3", "/d": "4"}, tx))
    assert xs.read_many(["/c", "/d"]) == [b"3", b"4"]
