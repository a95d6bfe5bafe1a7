"""Exec a domain's program with the limits its supervisor wants (and, on request, a parent-death signal).

The supervisor runs every domain process (and every VM's QEMU) as::

    python -I -S domain_exec.py [--nofile N] -- PROGRAM ARGS...

after ``subprocess`` has already switched to the domain's uid, so that:

* ``RLIMIT_NOFILE`` is set (soft and hard: the domain cannot raise it back)
  in the process that becomes the domain, without a ``preexec_fn`` in the
  multi-threaded supervisor;
* ``RLIMIT_CORE`` is 0 (soft and hard): a domain that crashes leaves no core
  file holding its memory (a guest's pages, a backend's mapped grants);
* with ``--parent PID`` only, ``PR_SET_PDEATHSIG`` is SIGKILL (the process
  dies with PID, and refuses to start if PID is already gone).  It is set
  here, after the uid change, because changing credentials clears it; it
  survives the exec.  The supervisor does not ask for it: a host outlives
  its supervisor (as containers outlive containerd), and a new supervisor
  adopts it (``deploy/adopt.py``).  Tests and tools that start a broker of
  their own use it (``launcher.start_broker(die_with_parent=True)``).

Not set here: ``PR_SET_DUMPABLE``.  ``execve`` resets it to 1 for an
ordinary program (checked on this host's kernel), so a domain makes itself
non-dumpable in ``xdom.domains.xenhost.connect()`` and refuses to run if it
cannot.  A ``program`` that never connects stays dumpable (the supervisor's
warning says so); RLIMIT_CORE 0 still keeps its memory out of core files.

Not set here either: a memory rlimit.  ``RLIMIT_AS`` counts address space
reserved, not memory used (a guest reserves its domain memory up front,
glibc reserves 64 MiB per malloc arena, every thread a stack), so a limit
near real use fails allocations at random places with ENOMEM.  A domain's
memory is bounded by its topology ``limits.rss`` instead, which the
supervisor measures over the domain and its children and enforces by
killing it and applying its restart policy.

Standard library only, and nothing imported that ``-S`` hides: it must start
fast and run under any uid that can run the interpreter.  Exit status 127
means the program could not be executed (the reason is on stderr, which is
the domain's log).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    args = list(argv)
    nofile = parent = None
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt in ("--nofile", "--parent") and args and args[0].isdigit():
            value = int(args.pop(0))
            if opt == "--nofile":
                nofile = value
            else:
                parent = value
        else:
            print(f"domain_exec: bad option {opt!r}", file=sys.stderr)
            return 127
    if len(args) < 2:
        print("domain_exec: no program to run (options -- PROGRAM ARGS...)", file=sys.stderr)
        return 127
    program = args[1:]
    if nofile is not None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and nofile > hard:
            print(f"domain_exec: fds limit {nofile} is above the hard limit {hard} of this host", file=sys.stderr)
            return 127
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if parent is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            print(f"domain_exec: prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
            return 127
        if os.getppid() != parent:
            return 127      # the parent died before the signal was armed
    try:
        os.execvp(program[0], program)
    except OSError as e:
        print(f"domain_exec: cannot execute {program[0]!r}: {e.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
