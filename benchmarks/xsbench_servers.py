"""bench_xenstored's servers under test: starting each (REF, OURS, ECHO), waiting until it is ready,
its CPU time, stopping it.

A server says it is ready on a pipe (``--ready-fd``), or, for the
reference, by answering on its socket; one that dies or hangs stops the
run with its log's tail.
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import signal
import subprocess
import sys
import time

from xsbench_client import BenchError, Client, check, xs_wire

READY_TIMEOUT = 60.0       # seconds a server may take to say "ready"
ECHO_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xsbench_echo.py")


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (ns, /proc/PID/task/*/schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


class Server:
    def __init__(self, name: str, argv: list[str], log_path: str, env: dict[str, str], sock_path: str,
                 state_dir: str | None, ready_fds: tuple[int, int] | None) -> None:
        self.name = name
        self.log_path = log_path
        self.sock_path = sock_path
        self.state_dir = state_dir
        self.ready_r = ready_fds[0] if ready_fds else None
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, pass_fds=(ready_fds[1],) if ready_fds else (),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    | " + line for line in lines[-n:]) or "    | (empty log)"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        if self.ready_r is None:          # the reference: ready once it answers on its socket
            while True:
                self.check_alive()
                try:
                    c = Client(self.sock_path)
                except OSError:
                    if time.monotonic() > deadline:
                        raise BenchError(f"{self.name} did not get ready within {READY_TIMEOUT:.0f} s\n"
                                         f"{self.log_tail()}") from None
                    time.sleep(0.05)
                    continue
                try:
                    xs = xs_wire()
                    r = c.rpc(xs.Message(xs.XsType.XS_DIRECTORY, 1, 0, b"/\0").encode())
                    check(r, f"{self.name}: DIRECTORY /", xs.XsType.XS_DIRECTORY, 1, 0, None)
                finally:
                    c.close()
                return
        got = b""
        try:
            while not got.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name} did not get ready within {READY_TIMEOUT:.0f} s\n{self.log_tail()}")
                r, _, _ = select.select([self.ready_r], [], [], left)
                if r:
                    chunk = os.read(self.ready_r, 64)
                    if not chunk:
                        break
                    got += chunk
        finally:
            os.close(self.ready_r)
        if not got.startswith(b"ready"):
            self.proc.poll()
            raise BenchError(f"{self.name} did not start (said {got!r}, exit status {self.proc.returncode})\n"
                             f"{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} died (exit status {self.proc.returncode})\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)


def find_reference(args: argparse.Namespace) -> tuple[list[str] | None, str]:
    """How to run Xen's C xenstored (argv before the socket path), and where it came from."""
    cmd = args.ref_xenstored or os.environ.get("XDOM_REF_XENSTORED")
    if cmd:
        return shlex.split(cmd), f"--ref-xenstored {cmd}"
    return None, ("missing: Debian's C xenstored cannot start without a hypervisor; give a launcher with "
                  "--ref-xenstored CMD (ratios below are against the ECHO floor)")


def start_server(name: str, tmp: str, ref_argv: list[str] | None) -> Server:
    sock_path = os.path.join(tmp, f"{name}.sock")
    log_path = os.path.join(tmp, f"{name}.log")
    state_dir = os.path.join(tmp, f"{name}-state") if name in ("xs_state", "xs_fsync") else None
    env = {k: v for k, v in os.environ.items() if k not in ("XDOM_HYPERCALL", "XDOM_TOKEN")}
    if name == "ref":
        assert ref_argv is not None
        env.setdefault("XS_SHIM_DOMAINS", "all")     # INTRODUCE in the bring-up rows needs live domains
        return Server(name, ref_argv + [sock_path], log_path, env, sock_path, None, None)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if name == "echo":
            argv = [sys.executable, ECHO_SERVER, sock_path, "--ready-fd", str(w)]
        elif name == "xs_fsync":
            argv = [sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--unix-socket", sock_path,
                    "--ready-fd", str(w), "--state-dir", state_dir, "--fsync"]
        else:
            argv = [sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--unix-socket", sock_path,
                    "--ready-fd", str(w)]
            if state_dir:
                argv += ["--state-dir", state_dir]
        return Server(name, argv, log_path, env, sock_path, state_dir, (r, w))
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
