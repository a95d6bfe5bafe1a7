"""A network namespace per domain: created by the toolstack, entered only by that domain's process.

A guest's programs get a network of their own (netfront's TAP device will
live there), and a driver domain that is compromised cannot reach the host's
interfaces.  Namespaces are made with iproute2 (``ip netns add``), so they
are visible to ``ip netns list`` and usable with ``ip netns exec NAME`` by
the user, and named after the domain plus a short hash of the host's run
directory (two hosts with a guest ``g1`` each never share one).

The supervisor starts a domain inside its namespace by switching the
*spawning thread* into it just around the fork (``setns`` changes only the
calling thread's namespace; the child inherits it), so the domain is in its
namespace before its first instruction and before its uid drops, with no
``preexec_fn`` in a threaded supervisor.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NETNS_DIR", "NetnsError", "create", "delete", "entered", "exists", "netns_name", "of_host",
           "unavailable_reason"]

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """A namespace could not be made, entered or removed."""


def netns_name(domain: str, run_dir: str) -> str:
    """``xdom-<domain>-<8 hex>``: the domain's name, made unique per host."""
    tag = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    return f"xdom-{domain}-{tag}"


def unavailable_reason() -> str | None:
    """Why this host cannot give domains namespaces, or None when it can."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    return None


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {res.stderr.strip() or f'status {res.returncode}'}")


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def create(name: str) -> None:
    """Make the namespace (kept if it exists: a restarted domain gets its own back) with loopback up."""
    if not exists(name):
        _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")


def of_host(run_dir: str) -> list[str]:
    """The namespaces made for the domains of the host at ``run_dir`` that still exist."""
    tag = netns_name("", run_dir).rsplit("-", 1)[1]
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("xdom-") and n.endswith(f"-{tag}"))


def delete(name: str) -> None:
    if exists(name):
        _ip("netns", "delete", name)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body (a fork, typically) with this thread in namespace ``name``; always switch back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
