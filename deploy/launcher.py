"""Starting the broker and domain processes (the toolstack's low level).

The supervisor builds on this; tests use it directly.  Nothing here sleeps
to wait for readiness: the broker reports readiness on a pipe, and a domain
is running once the broker publishes it so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xdom.broker.mgmt_client import ManagementClient, endpoint_for

from .host_state import AdoptedProcess


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[bytes] | AdoptedProcess     # AdoptedProcess: another supervisor's broker
    run_dir: str

    @property
    def mgmt_endpoint(self) -> str:
        return endpoint_for(self.run_dir)

    def client(self, timeout: float = 10.0) -> ManagementClient:
        return ManagementClient(self.mgmt_endpoint, timeout)

    def stop(self, timeout: float = 10.0) -> int:
        return stop_process(self.proc, timeout)


def start_broker(run_dir: str, log_path: str | None = None, timeout: float = 30.0,
                 extra_args: Sequence[str] = (), die_with_parent: bool = False) -> BrokerProcess:
    """Start ``xdom broker`` and return once it serves requests.

    ``die_with_parent``: the broker gets PR_SET_PDEATHSIG (through
    domain_exec), so a supervisor killed outright takes its broker along.
    """
    os.makedirs(run_dir, mode=0o755, exist_ok=True)    # the broker refuses a run directory others can write
    argv = [sys.executable, "-m", "xdom.deploy.cli", "broker", "--run-dir", run_dir, *extra_args]
    if die_with_parent:
        from .isolation import DOMAIN_EXEC
        argv = [sys.executable, "-I", "-S", DOMAIN_EXEC, "--parent", str(os.getpid()), "--", *argv]
    proc = start_ready(argv, log_path or os.path.join(run_dir, "broker.log"), "broker", timeout)
    return BrokerProcess(proc, run_dir)


def start_ready(argv: Sequence[str], log_path: str, what: str, timeout: float = 30.0,
                start: Callable[..., subprocess.Popen[bytes]] | None = None) -> subprocess.Popen[bytes]:
    """Start a program that takes ``--ready-fd N`` and return once it wrote to it.

    Output goes to ``log_path``.  ``start(argv, **popen)`` launches it
    (default: a new session of its own); a program that dies or stays
    silent is stopped and reported.
    """
    rfd, wfd = os.pipe()
    log = open(log_path, "ab")
    launch = start or (lambda a, **kw: subprocess.Popen(a, start_new_session=True, **kw))
    try:
        proc = launch([*argv, "--ready-fd", str(wfd)], pass_fds=(wfd,), stdout=log, stderr=subprocess.STDOUT)
    finally:
        os.close(wfd)
        log.close()
    try:
        _wait_ready(rfd, proc, timeout, what)
    except BaseException:
        stop_process(proc)
        raise
    finally:
        os.close(rfd)
    return proc


def _wait_ready(rfd: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    import select
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what} not ready within {timeout}s")
        r, _, _ = select.select([rfd], [], [], left)
        if r:
            if os.read(rfd, 64):
                return
            raise RuntimeError(f"{what} exited before it was ready (status {proc.wait()})")


def spawn_domain(mgmt: ManagementClient, name: str, argv: Sequence[str], memory: int | str = "4M",
                 privileged: bool = False, env: dict[str, str] | None = None, uid: int | None = None,
                 **popen: Any) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    """Create a domain in the broker and start its process with its credentials."""
    creds = mgmt.request("create", name=name, memory=memory, privileged=privileged,
                         uid=uid if uid is not None else os.geteuid())
    return creds, start_domain_process(creds, argv, env=env, uid=uid, **popen)


def start_domain_process(creds: dict[str, Any], argv: Sequence[str], env: dict[str, str] | None = None,
                         uid: int | None = None, **popen: Any) -> subprocess.Popen[bytes]:
    """Start the process of a created (or restarted) domain with its credentials.

    With ``uid`` (root only) the process runs as that user and group, so
    that its frames (memfds, mode 0600) cannot be reopened by other domains.
    """
    if uid is not None:
        popen.update(user=uid, group=uid, extra_groups=[])
    child_env = dict(os.environ if env is None else env)
    child_env.update(XDOM_HYPERCALL=creds["hypercall"], XDOM_TOKEN=creds["token"],
                     XDOM_DOMID=str(creds["domid"]), XDOM_NAME=creds["name"])
    return subprocess.Popen(list(argv), env=child_env, start_new_session=True, **popen)


@dataclass
class XenstoredDomain:
    creds: dict[str, Any]
    proc: subprocess.Popen[bytes]
    socket_path: str

    @property
    def domid(self) -> int:
        return int(self.creds["domid"])

    def stop(self, timeout: float = 10.0) -> int:
        return stop_process(self.proc, timeout)


def start_xenstored_domain(mgmt: ManagementClient, socket_path: str, state_dir: str | None = None,
                           name: str = "xenstore", memory: int | str = "2M", timeout: float = 30.0,
                           creds: dict[str, Any] | None = None) -> XenstoredDomain:
    """Create the xenstore domain and start ``xdom xenstored`` in it; return once it serves.

    With ``creds`` (from a management ``restart``) a new process takes over
    the existing domain and, with the same ``state_dir``, the store.
    """
    if creds is None:
        creds = mgmt.request("create", name=name, memory=memory, privileged=True)
    argv = [sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--unix-socket", socket_path]
    if state_dir:
        argv += ["--state-dir", state_dir]
    log_dir = state_dir or os.path.dirname(socket_path)
    os.makedirs(log_dir, exist_ok=True)
    proc = start_ready(argv, os.path.join(log_dir, f"{name}.log"), "xenstored", timeout,
                       start=lambda a, **kw: start_domain_process(creds, a, **kw))
    return XenstoredDomain(creds, proc, socket_path)


def signal_group(pid: int, pidfd: int, sig: int) -> None:
    """``sig`` to the process group a supervised process leads (it runs in a session of its own: the group is
    the process and its children); through its pidfd alone when the group is not ours to signal."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass


def stop_process(proc: subprocess.Popen[Any] | AdoptedProcess, timeout: float = 10.0) -> int:
    """SIGTERM, a grace period, then SIGKILL of the process group; always reaps."""
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
    return proc.wait()
