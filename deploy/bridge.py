"""The toolstack's side of netback's Linux-bridge mode: bridges and backend TAPs in netback's namespace.

Under Xen a driver domain has a network stack of its own: netback's
``vifX.Y`` devices live there, and the hotplug script (``vif-bridge``)
adds each to the bridge the vif's ``bridge=`` names.  Here netback's
namespace is that stack.  For every vif a netback in bridge mode serves,
the toolstack makes, inside netback's namespace (with iproute2, as root,
before netback is told about the vif):

* the bridge, if it is missing (``ip link add NAME type bridge``, up; STP
  off, so a port forwards as soon as it has carrier);
* a persistent TAP ``vif<frontend domid>.<devid>`` owned by netback's uid
  (``ip tuntap add ... user UID``), with the vif's MTU, a port of the
  bridge, up.  A frontend's domid is unique on a host and kept across its
  restarts, so the name never collides and stays valid for a restarted
  guest.

netback runs without CAP_NET_ADMIN and, as guests do, attaches to its TAP
through a ``/dev/net/tun`` descriptor the toolstack opened inside its
namespace (:func:`xdom.deploy.tap.open_tun`) and handed over its device
channel.  Everything here lives in netback's namespace: deleting the
namespace (``xdom down``, ``xdom destroy``) removes the bridges and TAPs; a vif detached
or a guest destroyed loses its TAP (:func:`xdom.deploy.tap.delete_tap`).
"""

from __future__ import annotations

import json

from .tap import TapError, _ip

__all__ = ["IFNAMSIZ", "backend_tap_name", "ensure_bridge", "ensure_port", "link_kind"]

IFNAMSIZ = 16       # including the NUL: a Linux interface name has at most 15 bytes


def backend_tap_name(frontend_domid: int, devid: int) -> str:
    """``vif<fe domid>.<devid>``: the name Xen gives netback's device for a vif.

    Raises TapError when it does not fit a Linux interface name (a huge devid).
    """
    name = f"vif{frontend_domid}.{devid}"
    if len(name) >= IFNAMSIZ:
        raise TapError(f"the backend TAP name {name} is longer than {IFNAMSIZ - 1} bytes, the limit of a Linux "
                       f"interface name; use a smaller devid")
    return name


def link_kind(netns: str, ifname: str) -> str | None:
    """The device's kind in the namespace ("bridge", "tun", ... or "" for a plain device), None if absent."""
    res = _ip("-n", netns, "-d", "-j", "link", "show", "dev", ifname, check=False)
    if res.returncode != 0:
        return None
    try:
        info = json.loads(res.stdout)[0]
    except (ValueError, IndexError, TypeError) as e:
        raise TapError(f"ip -n {netns} -d -j link show dev {ifname}: unreadable output ({e})") from None
    return str(info.get("linkinfo", {}).get("info_kind", ""))


def ensure_bridge(netns: str, name: str) -> bool:
    """Make bridge ``name`` in the namespace unless it is there; up either way.  True if it was made now.

    A device of that name that is not a bridge is an error.
    """
    kind = link_kind(netns, name)
    made = False
    if kind is None:
        _ip("-n", netns, "link", "add", "name", name, "type", "bridge", "stp_state", "0")
        made = True
    elif kind != "bridge":
        raise TapError(f"{name} in namespace {netns} is a {kind or 'plain'} device, not a bridge; a vif's "
                       f"bridge= must name a bridge")
    _ip("-n", netns, "link", "set", "dev", name, "up")
    return made


def ensure_port(netns: str, ifname: str, owner_uid: int, mtu: int, bridge: str) -> bool:
    """A persistent TAP ``ifname`` owned by ``owner_uid``, with ``mtu``, a port of ``bridge``, up.

    Kept when it exists (a restarted netback's TAPs are where it left them:
    only the MTU, master and link state are set again); a device of that
    name that is not a TAP is an error.  True if it was made now; a TAP
    made now and left half-configured by a failure is removed before the
    TapError is raised.
    """
    kind = link_kind(netns, ifname)
    made = False
    if kind is None:
        _ip("-n", netns, "tuntap", "add", "dev", ifname, "mode", "tap", "user", str(owner_uid))
        made = True
    elif kind != "tun":
        raise TapError(f"{ifname} in namespace {netns} is a {kind or 'plain'} device, not a TAP")
    try:
        _ip("-n", netns, "link", "set", "dev", ifname, "mtu", str(mtu), "master", bridge, "up")
    except BaseException:
        if made:
            _ip("-n", netns, "link", "delete", "dev", ifname, check=False)
        raise
    return made

