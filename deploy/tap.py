"""The toolstack's side of a guest's network interface: a TAP device in the guest's namespace.

A domain runs under its own uid without CAP_NET_ADMIN, so it cannot create
a network device, set its address or bring it up.  The toolstack does that
with iproute2, inside the domain's namespace (:mod:`xdom.deploy.netns`),
before the domain starts: what a Xen hotplug script does for a vif.  The
TAP is made persistent and owned by the domain's uid (``ip tuntap add ...
user UID``), which is all the kernel asks (``tun_not_capable``) for that uid
to attach to it with ``TUNSETIFF`` (``IFF_TAP | IFF_NO_PI``) unprivileged;
any other uid gets EPERM.  The guest then moves its frames between the TAP
and netfront's rings.

The TAP's MAC is the guest's own (xl.cfg's ``mac=``): under Xen that is
the address of the guest's eth0, and the TAP is the guest's eth0 here.

Attaching needs a file descriptor on ``/dev/net/tun`` too.  The kernel
makes that node 0666, but a host may restrict it (the test host has it
0600, root only); :func:`open_tun` opens one for the toolstack to hand to
the domain at spawn.  It must be opened *inside* the namespace: tun binds
the descriptor to its opener's namespace, and ``TUNSETIFF`` looks the
device up there.
"""

from __future__ import annotations

import os
import subprocess

from xdom.deploy import netns as _netns

__all__ = ["TapError", "create_tap", "delete_tap", "open_tun", "tap_exists"]

TUN_PATH = "/dev/net/tun"


class TapError(Exception):
    """An ``ip`` command failed; the message carries the command and its stderr."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise TapError(f"ip {' '.join(args)}: {res.stderr.strip() or f'status {res.returncode}'}")
    return res


def tap_exists(netns: str, ifname: str) -> bool:
    """Whether namespace ``netns`` exists and has a device ``ifname`` (a TAP or not)."""
    return _netns.exists(netns) and _ip("-n", netns, "link", "show", "dev", ifname, check=False).returncode == 0


def create_tap(netns: str, ifname: str, owner_uid: int, mac: str, mtu: int, address: str | None) -> None:
    """Make a persistent TAP ``ifname`` owned by ``owner_uid`` in the namespace, configured and up.

    ``address`` is an interface address with its prefix ("10.77.0.1/24"),
    or None for none.  A device left half-configured by a failure is
    removed before the TapError is raised; an existing ``ifname`` is an
    error (check :func:`tap_exists` to keep a restarted domain's TAP).
    """
    _ip("-n", netns, "tuntap", "add", "dev", ifname, "mode", "tap", "user", str(owner_uid))
    try:
        _ip("-n", netns, "link", "set", "dev", ifname, "address", mac)
        _ip("-n", netns, "link", "set", "dev", ifname, "mtu", str(mtu))
        if address is not None:
            _ip("-n", netns, "address", "add", address, "dev", ifname)
        _ip("-n", netns, "link", "set", "dev", ifname, "up")
    except BaseException:
        _ip("-n", netns, "link", "delete", "dev", ifname, check=False)
        raise


def delete_tap(netns: str, ifname: str) -> None:
    """Remove the device; a namespace or device already gone is not an error."""
    if not tap_exists(netns, ifname):
        return
    res = _ip("-n", netns, "link", "delete", "dev", ifname, check=False)
    if res.returncode != 0 and tap_exists(netns, ifname):
        raise TapError(f"ip -n {netns} link delete dev {ifname}: {res.stderr.strip()}")


def open_tun(netns: str) -> int:
    """A descriptor on ``/dev/net/tun`` bound to the namespace, for a domain to ``TUNSETIFF`` its TAP.

    Close-on-exec: pass it to the domain explicitly (``pass_fds``).  Opened by
    this thread switched into the namespace just around the ``open``.
    """
    try:
        with _netns.entered(netns):
            return os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except (OSError, _netns.NetnsError) as e:
        raise TapError(f"cannot open {TUN_PATH} in namespace {netns}: {e}") from None
