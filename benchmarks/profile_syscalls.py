"""Measure the syscalls each kind of domain makes once it is locked down: the source of the seccomp lists.

Usage (as root, strace installed)::

    .venv/bin/python benchmarks/profile_syscalls.py [--out DIR] -- COMMAND ARGS...

for instance the demo (the test-suite runs behind the lists are in
``domains/confinement/PROFILE.md``)::

    .venv/bin/python benchmarks/profile_syscalls.py --out /tmp/prof -- .venv/bin/python -m xdom.deploy.demo

It runs COMMAND with ``XDOM_CONFINE=log`` (every domain still installs its
filter, but an unlisted syscall is logged instead of killing, so the
workload runs whole), watches ``/proc`` for domain processes (blkback,
netback, guest, and xenstored started as a domain) and attaches
``strace -f -qq -X verbose`` to each as soon as it appears.  From each
trace it keeps the calls made by the domain's own threads *after* its
``seccomp(SECCOMP_SET_MODE_FILTER, ...)``: start-up (imports, connecting
to the broker) needs nothing from the list, and children (a guest's
workload) are not the domain.  ``ioctl`` requests, ``socket`` families and
``clone`` flags are recorded too, because the filter checks those.

It prints, per kind, the calls seen and those the current policy
(:mod:`xdom.domains.confinement.policy`) does not allow, and writes the
whole as JSON to ``DIR/profile.json``.  Runs add up: ``--merge`` folds an
earlier ``profile.json`` in.  ``--reuse`` parses the traces already in DIR
without running anything.

Besides strace, ``XDOM_CONFINE=log`` makes the kernel audit every
unlisted call (``dmesg | grep 'type=1326'``, ``code=0x7ffc0000``): a quick
check, on a host without strace, that a workload needs nothing new.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict

MARKERS = (("xdom.backends.blkback", "blkback"), ("xdom.backends.netback", "netback"),
           ("xdom.domains.guest", "guest"))

LINE = re.compile(r"^(\d+) +(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")
CLONE_RESULT = re.compile(r"= (\d+)(?: <unfinished|$|\s)")
IOCTL_REQ = re.compile(r"^\d+, (0x[0-9a-f]+|[A-Z_0-9]+)")
SOCKET_FAMILY = re.compile(r"^(0x[0-9a-f]+|\d+|AF_\w+)")


def kind_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    text = " ".join(a.decode(errors="replace") for a in argv)
    if "profile_syscalls" in text:
        return None
    for marker, kind in MARKERS:
        if f"-m {marker}" in text:
            return kind
    if "xdom.deploy.cli" in text and " xenstored " in f"{text} " and "--ready-fd" in text:
        return "xenstored"          # as the supervisor and the launcher start it (a domain)
    return None


def descends(pid: int, root: int) -> bool:
    """Whether ``pid`` runs under ``root`` (other people's domains on the same host are not ours to trace)."""
    for _ in range(64):
        if pid == root:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


class Watcher(threading.Thread):
    def __init__(self, out: str) -> None:
        super().__init__(daemon=True)
        self.root = 0                        # the command's pid, once it runs
        self.out = out
        self.seen: set[int] = set()
        self.straces: list[subprocess.Popen[bytes]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) in self.seen:
                    continue
                pid = int(name)
                kind = kind_of(pid)
                if kind is None or not descends(pid, self.root):
                    continue
                self.seen.add(pid)
                path = os.path.join(self.out, f"{kind}.{pid}.trace")
                self.straces.append(subprocess.Popen(
                    ["strace", "-f", "-qq", "-X", "verbose", "-s", "0", "-o", path, "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.stop.wait(0.02)


def _children(path: str) -> tuple[set[int], set[int]]:
    """First pass: which tids are threads made by clone(CLONE_THREAD), which are new processes."""
    threads: set[int] = set()
    processes: set[int] = set()
    pending: dict[int, bool] = {}            # tid -> the clone it is in makes a thread
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m or (m.group(2) or m.group(3)) not in ("clone", "clone3", "fork", "vfork"):
                continue
            tid, rest = int(m.group(1)), m.group(4)
            if m.group(3):
                pending[tid] = "CLONE_THREAD" in rest
            r = CLONE_RESULT.search(rest)
            if r and "unfinished" not in rest:
                (threads if pending.pop(tid, False) else processes).add(int(r.group(1)))
    return threads, processes


def parse(path: str) -> dict[str, set[str]] | None:
    """What the domain's threads called after its seccomp(); None if the trace never reached it."""
    threads, processes = _children(path)
    others = set(processes)                 # children (a guest's workload) and theirs: not the domain
    locked = False
    calls: set[str] = set()
    ioctls: set[str] = set()
    families: set[str] = set()
    clones: set[str] = set()
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            tid = int(m.group(1))
            if tid in others:
                continue
            name, rest = m.group(2) or m.group(3), m.group(4)
            if m.group(3) and name in ("clone", "clone3", "fork", "vfork") and "CLONE_THREAD" not in rest:
                r = CLONE_RESULT.search(rest)
                if r and "unfinished" not in rest:
                    others.add(int(r.group(1)))
            if m.group(3) and name == "seccomp" and "SECCOMP_SET_MODE_FILTER" in rest:
                locked = True
                continue
            if not locked or not m.group(3):
                continue
            calls.add(name)
            if name in ("clone", "clone3"):
                flags = re.search(r"flags=([^,}]+)", rest)
                clones.add((flags.group(1) if flags else rest[:60]).replace(" <unfinished ...>", ""))
            elif name == "ioctl":
                r2 = IOCTL_REQ.search(rest)
                if r2:
                    req = r2.group(1)
                    comment = re.search(r"/\* (\w+) \*/", rest[:80])
                    ioctls.add(f"{req} {comment.group(1)}" if comment else req)
            elif name == "socket":
                r3 = SOCKET_FAMILY.search(rest)
                comment = re.search(r"/\* (AF_\w+) \*/", rest[:60])
                families.add(comment.group(1) if comment else (r3.group(1) if r3 else rest[:20]))
    if not locked:
        return None
    return {"syscalls": calls, "ioctls": ioctls, "families": families, "clone_flags": clones}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/xdom-syscall-profile")
    p.add_argument("--merge", action="append", default=[], help="an earlier profile.json to add")
    p.add_argument("--reuse", action="store_true", help="parse the traces in --out; run nothing")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    os.makedirs(args.out, exist_ok=True)
    rc = 0
    if not args.reuse:
        if not cmd:
            p.error("a command to run")
        watcher = Watcher(args.out)
        env = dict(os.environ, XDOM_CONFINE="log")
        proc = subprocess.Popen(cmd, env=env)
        watcher.root = proc.pid
        watcher.start()
        try:
            rc = proc.wait()
        finally:
            watcher.stop.set()
            watcher.join()
            deadline = time.monotonic() + 30
            for s in watcher.straces:
                try:
                    s.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    s.send_signal(signal.SIGINT)        # detaches
                    s.wait()
    profile: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for src in args.merge:
        with open(src) as f:
            for kind, parts in json.load(f).items():
                for key, values in parts.items():
                    profile[kind][key].update(values)
    traces = skipped = 0
    for name in sorted(os.listdir(args.out)):
        if not name.endswith(".trace"):
            continue
        got = parse(os.path.join(args.out, name))
        if got is None:
            skipped += 1
            continue
        traces += 1
        for key, values in got.items():
            profile[name.split(".")[0]][key].update(values)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump({k: {key: sorted(v) for key, v in parts.items()} for k, parts in profile.items()}, f, indent=1)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xdom.domains.confinement import policy
    print(f"{traces} domain traces ({skipped} never locked down: attached too late, or not a domain)")
    for kind in sorted(profile):
        parts = profile[kind]
        allowed = policy.syscalls_of(kind) | {"clone", "ioctl", "socket"} | set(policy.ERRNO)
        print(f"\n{kind}: {len(parts['syscalls'])} syscalls: {' '.join(sorted(parts['syscalls']))}")
        print(f"  ioctls: {', '.join(sorted(parts['ioctls'])) or '-'}")
        print(f"  socket families: {', '.join(sorted(parts['families'])) or '-'}")
        print(f"  clone flags: {' | '.join(sorted(parts['clone_flags'])) or '-'}")
        missing = sorted(parts["syscalls"] - allowed)
        print(f"  NOT ALLOWED by the policy: {' '.join(missing) or 'none'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
