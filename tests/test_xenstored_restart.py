"""xenstored killed with SIGKILL and restarted keeps what it committed."""

from __future__ import annotations

import os
import signal

from xdom.deploy.launcher import start_xenstored_domain
from xdom.domains.xenstore import XenstoreClient

from helpers import wait_until
from xs_fixtures import start_guest, start_xenstored


def test_nodes_and_permissions_survive_sigkill(run_dir: str) -> None:
    xsd = start_xenstored(run_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            for i in range(50):
                c.write(f"/keep/n{i}", f"value {i}")
            c.set_perms("/keep/n7", ["n3", "r4"])
            c.transaction(lambda tx: [c.write(f"/keep/tx{i}", "t", tx) for i in range(5)])
        xsd.proc.send_signal(signal.SIGKILL)
        xsd.proc.wait()
    finally:
        xsd.stop()
    xsd = start_xenstored(run_dir, xsd.state_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            assert [c.read(f"/keep/n{i}") for i in range(50)] == [f"value {i}".encode() for i in range(50)]
            assert c.get_perms("/keep/n7") == ["n3", "r4"]
            assert c.directory("/keep")[-5:] == [f"tx{i}" for i in range(5)]
    finally:
        xsd.stop()


def test_guest_ring_and_watch_survive_a_xenstored_domain_restart(mgmt, run_dir: str) -> None:
    sock = os.path.join(run_dir, "xs.sock")
    state = os.path.join(run_dir, "xs-state")
    xs = start_xenstored_domain(mgmt, sock, state)
    guest = None
    try:
        dom0 = XenstoreClient.unix(sock)
        guest = start_guest(mgmt, dom0, xs, "g")
        base = f"/local/domain/{guest.domid}"
        guest.call("xs_connect")
        guest.call("xs_write", path="before", value="1")
        guest.call("xs_watch", path=f"{base}/ctl", token="ctl")
        assert guest.call("xs_events", n=1, secs=10)["events"] == [[f"{base}/ctl", "ctl"]]
        dom0.close()

        xs.proc.send_signal(signal.SIGKILL)          # the xenstore domain crashes
        xs.proc.wait()
        wait_until(lambda: mgmt.request("info", domid=xs.domid)["domain"]["state"] == "crashed",
                   what="the broker to see xenstored die")
        creds = mgmt.request("restart", domid=xs.domid)
        xs = start_xenstored_domain(mgmt, sock, state, creds=creds)

        dom0 = XenstoreClient.unix(sock)
        assert dom0.read(f"{base}/before") == b"1"
        guest.call("xs_write", path="after", value="2")          # the same ring, a new xenstored
        assert dom0.read(f"{base}/after") == b"2"
        dom0.write(f"{base}/ctl", "go")
        assert guest.call("xs_events", n=1, secs=10)["events"] == [[f"{base}/ctl", "ctl"]]
        dom0.close()
    finally:
        if guest is not None:
            guest.stop()
        xs.stop()
