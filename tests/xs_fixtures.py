"""Starting a standalone `xdom xenstored --unix-socket` for a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import psutil

from xdom.deploy.agent_client import AgentProcess
from xdom.deploy.launcher import XenstoredDomain, start_ready, stop_process
from xdom.domains.abi.xs_wire import Message, MessageReader, XsType
from xdom.domains.xenstore import XenstoreClient


@dataclass
class Xenstored:
    proc: subprocess.Popen[bytes]
    socket_path: str
    state_dir: str

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> int:
        return stop_process(self.proc)


def start_xenstored(run_dir: str, state_dir: str | None = None) -> Xenstored:
    sock = os.path.join(run_dir, "xs.sock")
    state_dir = state_dir or os.path.join(run_dir, "xs-state")
    proc = start_ready([sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--unix-socket", sock,
                        "--state-dir", state_dir], os.path.join(run_dir, "xenstored.log"), "xenstored")
    return Xenstored(proc, sock, state_dir)


class RawConn:
    """A xenstore connection speaking raw xs_wire messages."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = MessageReader()
        self.queue: list[Message] = []
        self.next_id = 1

    def send(self, type_: int, payload: bytes, tx: int = 0, req_id: int | None = None) -> int:
        rid = self.next_id if req_id is None else req_id
        self.next_id += 1
        self.sock.sendall(Message(type_, rid, tx, payload).encode())
        return rid

    def recv(self) -> Message:
        while not self.queue:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("xenstored closed the connection")
            self.queue += self.reader.feed(data)
        return self.queue.pop(0)

    def call(self, type_: int, payload: bytes, tx: int = 0) -> Message:
        rid = self.send(type_, payload, tx)
        while True:
            msg = self.recv()
            if msg.type != XsType.XS_WATCH_EVENT and msg.req_id == rid:
                return msg

    def close(self) -> None:
        self.sock.close()


def start_guest(mgmt, dom0: XenstoreClient, xenstored: XenstoredDomain, name: str) -> AgentProcess:
    """What the toolstack does: store set-up, start, domain path, introduce."""
    creds = mgmt.request("create", name=name, memory="1M")
    store = mgmt.request("setup_store", domid=creds["domid"], xenstore_domid=xenstored.domid)
    guest = AgentProcess(mgmt, name, creds=creds)
    path = f"/local/domain/{guest.domid}"
    dom0.write(path, "")
    dom0.set_perms(path, [f"n{guest.domid}"])
    dom0.introduce(guest.domid, store["gfn"], store["port"])
    return guest


def nodes(xs: XenstoreClient, path: str) -> dict[str, str]:
    """Every node directly under ``path`` with its value."""
    return {key: xs.read(f"{path}/{key}").decode() for key in xs.directory(path)}


def introduce(xs: XenstoreClient, *domids: int) -> None:
    """XS_INTRODUCE each domain not introduced yet, as a toolstack does before writing its devices.

    For a standalone xenstored beside an in-process (local) hypervisor: it cannot
    ask that hypervisor which domains exist, so it knows only those introduced to
    it and refuses (ENOENT) permissions owned by any other, as Xen's does (XSA-322).
    No ring is mapped (it has no hypervisor connection); clients stay on the socket.
    """
    for domid in domids:
        if not xs.is_domain_introduced(domid):
            xs.introduce(domid, 0, 1)
