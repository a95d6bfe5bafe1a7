"""A vif's xenstore nodes (add_vif/remove_vif) and its TAP device (deploy.tap).

The node tests run a standalone xenstored and read everything back through
XenstoreClient: values, permissions, a live frontend kept across a backend
re-add, and libxl's detach handshake against a fake netback.  The TAP tests
need root and iproute2; each makes its own namespace and removes it, and
checks what an unprivileged domain can and cannot do with the device.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until
from xs_fixtures import Xenstored, introduce, nodes

from xdom.deploy import netns
from xdom.deploy.tap import TUN_PATH, TapError, create_tap, delete_tap, open_tun, tap_exists
from xdom.deploy.vif import VifConfig, add_vif, remove_vif
from xdom.domains.xenbus import XenbusState, read_state, switch_state
from xdom.domains.xenstore import XenstoreClient

pytestmark = pytest.mark.timeout(60)

BE, FE, DEVID = 3, 7, 0
MAC = "00:16:3e:12:34:56"
BE_PATH = f"/local/domain/{BE}/backend/vif/{FE}/{DEVID}"
FE_PATH = f"/local/domain/{FE}/device/vif/{DEVID}"


@pytest.fixture
def xs(xs: XenstoreClient) -> XenstoreClient:
    """The conftest client, with the backend and frontend domains introduced: a xenstored
    without a hypervisor knows only introduced domains, and refuses (ENOENT) permissions
    owned by any other, as Xen's does (XSA-322)."""
    introduce(xs, BE, FE)
    return xs


# ---- xenstore nodes -------------------------------------------------------------------------------

def test_add_vif_writes_libxl_nodes(xs: XenstoreClient) -> None:
    add_vif(xs, VifConfig(BE, FE, DEVID, MAC, bridge="xenbr0", mtu=1400, rate_bytes_per_interval=12500,
                          rate_interval_us=50000, ifname="eth1"))
    assert nodes(xs, BE_PATH) == {
        "frontend": FE_PATH, "frontend-id": str(FE), "online": "1", "state": "1", "mac": MAC, "bridge": "xenbr0",
        "handle": str(DEVID), "type": "vif", "mtu": "1400", "rate": "12500,50000",
    }
    assert nodes(xs, FE_PATH) == {
        "backend": BE_PATH, "backend-id": str(BE), "state": "1", "handle": str(DEVID), "mac": MAC, "mtu": "1400",
        "xdom-ifname": "eth1",
    }


def test_optional_nodes_are_left_out(xs: XenstoreClient) -> None:
    add_vif(xs, VifConfig(BE, FE, 2, MAC))
    be = nodes(xs, f"/local/domain/{BE}/backend/vif/{FE}/2")
    assert "bridge" not in be and "rate" not in be and "script" not in be
    assert be["mtu"] == "1500" and be["handle"] == "2"
    assert nodes(xs, f"/local/domain/{FE}/device/vif/2")["xdom-ifname"] == "eth0"


def test_rate_needs_both_halves() -> None:
    with pytest.raises(ValueError, match="together"):
        VifConfig(BE, FE, DEVID, MAC, rate_bytes_per_interval=100)


def test_permissions(xs: XenstoreClient) -> None:
    add_vif(xs, VifConfig(BE, FE, DEVID, MAC, bridge="xenbr0"))
    for key in [""] + xs.directory(BE_PATH):
        assert xs.get_perms(f"{BE_PATH}/{key}".rstrip("/")) == [f"n{BE}", f"r{FE}"], key
    for key in [""] + xs.directory(FE_PATH):
        assert xs.get_perms(f"{FE_PATH}/{key}".rstrip("/")) == [f"n{FE}", f"r{BE}"], key
    for d in (f"/local/domain/{BE}/backend", f"/local/domain/{BE}/backend/vif", f"/local/domain/{BE}/backend/vif/{FE}"):
        assert xs.get_perms(d) == ["n0", f"r{BE}"], d
    assert xs.get_perms(f"/local/domain/{FE}/device/vif") == ["n0", f"r{FE}"]


def test_re_add_keeps_a_live_frontend(xs: XenstoreClient) -> None:
    """A restarted backend gets fresh nodes; the connected frontend's ring and state stay, with perms set anew."""
    add_vif(xs, VifConfig(BE, FE, DEVID, MAC))
    xs.write(f"{FE_PATH}/tx-ring-ref", "8")          # written as the frontend would, but as dom0:
    xs.write(f"{FE_PATH}/state", str(int(XenbusState.Connected)))
    xs.write(f"{BE_PATH}/state", str(int(XenbusState.Connected)))
    xs.write(f"{BE_PATH}/feature-sg", "1")
    xs.set_perms(f"{BE_PATH}/online", ["n0"])

    add_vif(xs, VifConfig(BE, FE, DEVID, MAC, mtu=9000, ifname="eth9"))
    fe = nodes(xs, FE_PATH)
    assert fe["tx-ring-ref"] == "8" and fe["state"] == str(int(XenbusState.Connected))
    assert fe["mtu"] == "1500" and fe["xdom-ifname"] == "eth0"     # the frontend's nodes are not rewritten
    assert read_state(xs, BE_PATH) == XenbusState.Initialising
    assert xs.read(f"{BE_PATH}/mtu") == b"9000"
    for key in xs.directory(FE_PATH):
        assert xs.get_perms(f"{FE_PATH}/{key}") == [f"n{FE}", f"r{BE}"], key
    for key in xs.directory(BE_PATH):
        assert xs.get_perms(f"{BE_PATH}/{key}") == [f"n{BE}", f"r{FE}"], key


def test_re_add_rewrites_a_closed_frontend(xs: XenstoreClient) -> None:
    add_vif(xs, VifConfig(BE, FE, DEVID, MAC))
    xs.rm(f"{FE_PATH}/state")
    add_vif(xs, VifConfig(BE, FE, DEVID, MAC, ifname="eth3"))
    assert nodes(xs, FE_PATH)["xdom-ifname"] == "eth3"


def test_remove_vif_with_a_backend(xenstored: Xenstored, xs: XenstoreClient) -> None:
    """A fake netback answers Closing with Closed, as netback does once the frontend has let go."""
    add_vif(xs, VifConfig(BE, FE, DEVID, MAC))
    seen: list[tuple[XenbusState, bytes | None]] = []
    with XenstoreClient.unix(xenstored.socket_path) as backend:
        def changed(path: str, token: str) -> None:
            state = read_state(backend, BE_PATH)
            if state == XenbusState.Closing:
                seen.append((state, backend.read(f"{BE_PATH}/online")))
                switch_state(backend, BE_PATH, XenbusState.Closed)   # not if the toolstack removed the device
        backend.watch(f"{BE_PATH}/state", "netback", changed)
        start = time.monotonic()
        assert remove_vif(xs, BE, FE, DEVID, timeout=10)
        assert time.monotonic() - start < 5
        backend.unwatch(f"{BE_PATH}/state", "netback")
    assert seen and seen[0] == (XenbusState.Closing, b"0")
    assert not xs.exists(BE_PATH) and not xs.exists(FE_PATH)
    assert xs.exists(f"/local/domain/{BE}/backend/vif/{FE}")      # only the device's own directories go


def test_remove_vif_times_out_without_a_backend(xs: XenstoreClient) -> None:
    add_vif(xs, VifConfig(BE, FE, DEVID, MAC))
    start = time.monotonic()
    assert remove_vif(xs, BE, FE, DEVID, timeout=0.3) is False
    assert 0.25 <= time.monotonic() - start < 5
    assert not xs.exists(BE_PATH) and not xs.exists(FE_PATH)


def test_remove_vif_of_a_missing_device(xs: XenstoreClient) -> None:
    """As remove_vbd: writing online/state makes the backend nodes, nobody closes them, the timeout
    runs out (False) and nothing of the device is left behind."""
    assert remove_vif(xs, BE, FE, 5, timeout=0.2) is False
    assert not xs.exists(f"/local/domain/{BE}/backend/vif/{FE}/5")
    assert not xs.exists(f"/local/domain/{FE}/device/vif/5")


# ---- TAP devices ----------------------------------------------------------------------------------

needs_netns = pytest.mark.skipif(netns.unavailable_reason() is not None,
                                 reason=f"TAP devices need {netns.unavailable_reason()}")

NOBODY = 65534
PYTHON = "/usr/bin/python3"          # readable by every uid, unlike a venv under a private home
# TUNSETIFF with IFF_TAP | IFF_NO_PI, as the guest does.  argv: fd ("open" to open /dev/net/tun itself) and
# the device name.  Prints "attached" and holds the device until stdin closes, or "error <errno> <where>".
ATTACH = """
import fcntl, os, struct, sys
where = "open"
try:
    fd = os.open("/dev/net/tun", os.O_RDWR) if sys.argv[1] == "open" else int(sys.argv[1])
    where = "TUNSETIFF"
    fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH22x", sys.argv[2].encode(), 0x0002 | 0x1000))
except OSError as e:
    print("error", e.errno, where, flush=True)
    sys.exit(1)
print("attached", os.getuid(), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def ns(run_dir: str) -> Iterator[str]:
    name = netns.netns_name("vif", run_dir)
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)
        assert not netns.exists(name)


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True,
                                     check=True).stdout)


def link(ns: str, ifname: str) -> dict[str, Any]:
    return ip_json(ns, "link", "show", "dev", ifname)[0]


class Attacher:
    """A child running ATTACH as ``uid``; ends in close() however the test went."""

    def __init__(self, argv_prefix: list[str], fd_arg: str, ifname: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.proc = subprocess.Popen([*argv_prefix, "setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                                      "--clear-groups", PYTHON, "-c", ATTACH, fd_arg, ifname],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=pass_fds)

    def result(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None or not os.path.exists(PYTHON),
                                   reason="needs setpriv and /usr/bin/python3")


@needs_netns
def test_create_tap_configures_the_device(ns: str) -> None:
    create_tap(ns, "eth0", NOBODY, MAC, 1400, "10.77.0.1/24")
    try:
        assert tap_exists(ns, "eth0")
        dev = link(ns, "eth0")
        assert dev["address"] == MAC and dev["mtu"] == 1400 and "UP" in dev["flags"]
        inet = [a for a in ip_json(ns, "address", "show", "dev", "eth0")[0]["addr_info"] if a["family"] == "inet"]
        assert [(a["local"], a["prefixlen"]) for a in inet] == [("10.77.0.1", 24)]
        info = ip_json(ns, "-d", "link", "show", "dev", "eth0")[0]["linkinfo"]
        assert info["info_kind"] == "tun" and info["info_data"]["type"] == "tap"
        assert info["info_data"]["persist"] and not info["info_data"]["pi"]
        assert info["info_data"]["user"] in (NOBODY, str(NOBODY), "nobody")     # ip prints the name if it has one
        assert not tap_exists(ns, "eth1")
    finally:
        delete_tap(ns, "eth0")
    assert not tap_exists(ns, "eth0")


@needs_netns
def test_create_tap_without_an_address(ns: str) -> None:
    create_tap(ns, "eth0", NOBODY, MAC, 1500, None)
    try:
        addrs = ip_json(ns, "address", "show", "dev", "eth0")[0]["addr_info"]
        assert [a for a in addrs if a["family"] == "inet"] == []
        assert link(ns, "eth0")["mtu"] == 1500
    finally:
        delete_tap(ns, "eth0")


@needs_netns
@needs_setpriv
def test_owner_attaches_unprivileged_with_a_tun_fd(ns: str) -> None:
    """The supervisor's path: a /dev/net/tun fd from open_tun, TUNSETIFF as the owner, no capabilities.

    The child shares the fd's open file, so the parent closes its copy: while
    it holds one, the TAP stays attached (and readable) after the guest exits.
    """
    create_tap(ns, "eth0", NOBODY, MAC, 1500, "10.77.0.1/24")
    fd = open_tun(ns)
    try:
        child = Attacher([], str(fd), "eth0", pass_fds=(fd,))   # not in the namespace: the fd carries it
        os.close(fd)
        fd = -1
        try:
            assert child.result() == f"attached {NOBODY}"
            wait_until(lambda: "LOWER_UP" in link(ns, "eth0")["flags"], what="carrier while the guest holds the TAP")
        finally:
            child.close()
        wait_until(lambda: "LOWER_UP" not in link(ns, "eth0")["flags"], what="carrier gone with the guest")
        assert tap_exists(ns, "eth0")                          # persistent: there for a restarted guest
    finally:
        if fd >= 0:
            os.close(fd)
        delete_tap(ns, "eth0")


@needs_netns
@needs_setpriv
def test_another_uid_cannot_attach(ns: str) -> None:
    """``user UID`` is what lets the owner in: the same fd, the same call, another owner -> EPERM."""
    create_tap(ns, "eth0", NOBODY - 1, MAC, 1500, None)
    fd = open_tun(ns)
    try:
        child = Attacher([], str(fd), "eth0", pass_fds=(fd,))
        try:
            assert child.result() == "error 1 TUNSETIFF"
        finally:
            child.close()
    finally:
        os.close(fd)
        delete_tap(ns, "eth0")


@needs_netns
@needs_setpriv
def test_unprivileged_open_of_dev_net_tun(ns: str) -> None:
    """Whether a domain could do it all alone depends on /dev/net/tun's mode (0666 by default, 0600 on some hosts)."""
    create_tap(ns, "eth0", NOBODY, MAC, 1500, None)
    try:
        child = Attacher(["ip", "netns", "exec", ns], "open", "eth0")
        try:
            got = child.result()
        finally:
            child.close()
        mode = os.stat(TUN_PATH).st_mode
        if mode & stat.S_IROTH and mode & stat.S_IWOTH:
            assert got == f"attached {NOBODY}"
        else:
            assert got == "error 13 open", f"{TUN_PATH} is {stat.filemode(mode)}"
    finally:
        delete_tap(ns, "eth0")


@needs_netns
def test_errors_name_the_command_and_leave_nothing(ns: str) -> None:
    with pytest.raises(TapError, match=r"address zz:zz.*invalid"):
        create_tap(ns, "eth0", NOBODY, "zz:zz", 1500, None)
    assert not tap_exists(ns, "eth0")                     # the half-made device was removed
    with pytest.raises(TapError, match=r"mtu"):
        create_tap(ns, "eth0", NOBODY, MAC, 10, None)
    assert not tap_exists(ns, "eth0")

    create_tap(ns, "eth0", NOBODY, MAC, 1500, None)
    try:
        with pytest.raises(TapError, match="tuntap add dev eth0"):
            create_tap(ns, "eth0", NOBODY, MAC, 1500, None)
        assert tap_exists(ns, "eth0")                     # a failed second create leaves the first alone
    finally:
        delete_tap(ns, "eth0")

    missing = ns + "-gone"
    with pytest.raises(TapError, match=f"{missing}.*(No such file|Cannot open)"):
        create_tap(missing, "eth0", NOBODY, MAC, 1500, None)
    assert not netns.exists(missing)
    with pytest.raises(TapError, match=missing):
        open_tun(missing)


@needs_netns
def test_delete_tap_ignores_what_is_gone(ns: str) -> None:
    delete_tap(ns, "eth0")                                # no device
    delete_tap(ns + "-gone", "eth0")                      # no namespace
    assert not tap_exists(ns + "-gone", "eth0")
