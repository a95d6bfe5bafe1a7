"""What each kind of domain may do once it runs: its syscalls (seccomp) and its files (Landlock).

The lists are measured, not guessed: ``benchmarks/profile_syscalls.py``
runs workloads (the supervised test files, the demo) with ``XDOM_CONFINE=log``,
attaches ``strace -f`` to every domain process as it appears, and keeps,
per kind, every syscall made *after* the domain's ``seccomp()`` call (its
start-up, imports and connection to the broker happen before and need
nothing here).  PROFILE.md in this folder records the last run; to redo it,
see the header of that script.  What is listed beyond the measurement is
said so, with the reason, next to it.

:data:`NEVER` is what no domain gets, whatever a list says (checked when a
filter is built and by the tests).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Iterable

from .landlock import FS, NET, SCOPE, Ruleset
from .seccomp import SECCOMP_RET_KILL_PROCESS, ArgBits, ArgCheck, ArgIn, FilterSpec

__all__ = ["KINDS", "NEVER", "filter_spec", "ruleset", "syscalls_of"]

# ---- syscalls ----------------------------------------------------------------------------------

NEVER = frozenset({
    # other processes' memory and execution
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf", "perf_event_open",
    "reboot", "swapon", "swapoff", "iopl", "ioperm", "syslog", "acct", "quotactl", "quotactl_fd",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "vhangup",
    "lookup_dcookie", "nfsservctl", "uselib", "_sysctl", "create_module", "get_kernel_syms", "query_module",
    # mounts and namespaces (a domain's view is set by the toolstack before it starts)
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "open_tree_attr", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    # keys, handles, faults under our control, personalities
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at", "userfaultfd", "personality",
    "modify_ldt", "seccomp",
    # new programs and credentials (nothing is executed once a domain runs; its uid is the toolstack's)
    "execve", "execveat", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid",
    "setfsgid", "setgroups", "capset",
    # io_uring: a second syscall interface seccomp cannot see into
    "io_uring_setup", "io_uring_enter", "io_uring_register",
})

# Every running domain: CPython 3.11 + glibc threads, memory, polling, logging, and the xenhost
# (the hypercall socket with SCM_RIGHTS, eventfds, grant mappings and memfd frames, OFD locks on
# the grant table).  Measured (PROFILE.md) unless marked:
#   (v) not seen, but what another glibc or kernel turns the same call into (fstat for newfstatat,
#       clock_gettime when the vDSO cannot read the clock, mremap when realloc moves a large block);
#   (f) not seen, on a failure path that must report, not be killed: abort() raises SIGABRT with tgkill
#       (a fatal Python error), faulthandler re-raises a fatal signal the same way.
BASE = frozenset({
    # descriptors and files
    "read", "write", "readv", "writev", "close", "newfstatat", "fstat", "lseek", "openat", "fcntl", "pipe2",
    "eventfd2",
    "pread64", "pwrite64",  # the xenhost renewing a frame a grantee was given (replace_frames): measured since
    # memory (glibc shrinks a thread arena with madvise; grant mappings are mmap/munmap)
    "mmap", "munmap", "mprotect", "madvise", "brk", "mremap",
    # threads, time, signals
    "futex", "set_robust_list", "rseq", "gettid", "getpid", "exit", "exit_group", "clock_nanosleep",
    "clock_gettime", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill",
    "restart_syscall",      # a sleep or poll resumed after SIGSTOP/SIGCONT
    # waiting
    "poll", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait",
    # sockets (new ones: only the families below)
    "sendmsg", "recvmsg", "sendto", "recvfrom", "shutdown", "getsockopt", "setsockopt", "getsockname",
    # a broker that died and was replaced: the xenhost connects to the new one and rejoins it
    # (tests/test_broker_takeover.py, test_blk_domains.py's broker kill: measured there)
    "socket", "connect",
})

# Answered with an errno rather than a kill.  clone3 passes its flags in memory, out of the filter's
# reach: ENOSYS makes glibc fall back to clone, whose flags are checked (measured: threads start).
ERRNO = {"clone3": 38}     # ENOSYS

KIND_SYSCALLS: dict[str, frozenset[str]] = {
    # what a program that opts in gets: the runtime and the xenhost, nothing more
    "domain": frozenset(),
    # its socket's clients, and the store written to a temporary file then renamed over the old one
    # (--fsync: each journal record and snapshot on stable storage, fdatasync/fsync)
    "xenstored": frozenset({"accept4", "rename", "unlink", "fdatasync", "fsync"}),
    # positional I/O on the images (os.preadv/pwritev are preadv2/pwritev2), discard, flush
    "blkback": frozenset({"preadv2", "pwritev2", "fallocate", "fdatasync"}),
    # rings and TAPs: the runtime's calls are enough
    "netback": frozenset(),
    # NBD exports (bind, chmod, accept, a stale socket probed with connect and unlinked), waiting for
    # and stopping its workload; a VM's vhost-user devices: the INFLIGHT_SHMFD area it creates for QEMU
    # (GET_INFLIGHT_FD: memfd_create, ftruncate; measured, tests/test_vhost_user_blk_vm.py) and the VM's
    # memory fds it checks are not hugetlbfs (fstatfs: vhost_user/frontend_fds.py)
    "guest": frozenset({"bind", "listen", "accept4", "chmod", "unlink", "wait4",
                        "pidfd_send_signal", "memfd_create", "ftruncate", "fstatfs"}),
}
KINDS = tuple(KIND_SYSCALLS)

# clone: threads only (CLONE_VM and CLONE_THREAD set: no fork, whose child would keep every mapping the
# domain holds, grant mappings included, out of the broker's sight); no namespace flag (CLONE_NEWNS ..
# CLONE_NEWNET; NEWTIME is clone3's).  Measured: only glibc's pthread_create flags, 0x3d0f00.
CLONE_THREAD_VM = 0x00000100 | 0x00010000
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# ioctl requests (the kernel reads the request as an unsigned int).  Every kind: TCGETS (Python's
# open() asks whether a file is a terminal), FIONBIO (socket.setblocking), FIOCLEX.
TCGETS, FIONBIO, FIOCLEX = 0x5401, 0x5421, 0x5451
TUNSETIFF, TUNSETOFFLOAD, TUNSETCARRIER = 0x400454CA, 0x400454D0, 0x400454E2
BLKDISCARD, BLKGETSIZE64, BLKSSZGET, BLKPBSZGET = 0x1277, 0x80081272, 0x1268, 0x127B
IOCTLS_BASE = frozenset({TCGETS, FIONBIO, FIOCLEX})
KIND_IOCTLS: dict[str, frozenset[int]] = {
    "domain": frozenset(),
    "xenstored": frozenset(),
    # (c) not seen (the tests serve files): what backends/blkback/disk.py issues on a block device
    "blkback": frozenset({BLKDISCARD, BLKGETSIZE64, BLKSSZGET, BLKPBSZGET}),
    "netback": frozenset({TUNSETIFF, TUNSETOFFLOAD, TUNSETCARRIER}),       # a bridged vif's TAP
    "guest": frozenset({TUNSETIFF, TUNSETOFFLOAD}),                        # netfront's TAP
}
# socket families a domain may create after start-up: unix sockets (the hypercall socket to a broker
# that took over; a guest's NBD exports); nothing else (no netlink, no packet sockets, no TCP in any domain)
KIND_FAMILIES: dict[str, frozenset[int]] = {k: frozenset({socket.AF_UNIX}) for k in KIND_SYSCALLS}


def syscalls_of(kind: str) -> frozenset[str]:
    """The syscalls ``kind`` may make: unconditionally, but for ``socket`` (its family is checked); ``clone``
    (threads only) and ``ioctl`` (listed requests only) come on top, checked by argument."""
    if kind not in KIND_SYSCALLS:
        raise ValueError(f"no confinement policy for kind {kind!r} (kinds: {', '.join(KINDS)})")
    return BASE | KIND_SYSCALLS[kind]


def filter_spec(kind: str, default: int = SECCOMP_RET_KILL_PROCESS, extra: Iterable[str] = ()) -> FilterSpec:
    names = syscalls_of(kind) | frozenset(extra)
    bad = sorted(names & NEVER)
    if bad:
        raise ValueError(f"{kind}: never allowed in a domain: {', '.join(bad)}")
    allow: dict[str, ArgCheck | None] = {n: None for n in names}
    allow["clone"] = ArgBits(0, forbidden=CLONE_NAMESPACES, required=CLONE_THREAD_VM)
    allow["ioctl"] = ArgIn(1, IOCTLS_BASE | KIND_IOCTLS[kind])
    if "socket" in names:
        allow["socket"] = ArgIn(0, KIND_FAMILIES[kind])
    return FilterSpec.by_name(allow, ERRNO, default)


# ---- files ---------------------------------------------------------------------------------------

# Every right Landlock knows is handled (refused unless a rule below grants it); no domain executes
# anything once it runs, so EXECUTE is granted nowhere (mapping shared libraries is not an execute).
ALL_FS = (1 << 16) - 1


def _python_paths() -> list[str]:
    """Where the interpreter, its standard library, site-packages and xdom itself are read from."""
    paths = {p for p in sys.path if p and os.path.isabs(p)}
    for pkg in ("broker", "domains", "backends", "deploy"):      # an editable install keeps them apart
        spec = importlib.util.find_spec(f"xdom.{pkg}")
        paths.update(spec.submodule_search_locations or () if spec is not None else ())
    out = []
    for p in paths:
        p = os.path.realpath(p)
        if os.path.isfile(p):          # a zip on sys.path
            p = os.path.dirname(p)
        out.append(p)
    return sorted(set(out))


# Read-only, besides the interpreter's own paths: shared libraries (a module imported late may load
# one), the time zone (logging's timestamps), what glibc and the xenhost read from /proc/sys (glibc
# reads overcommit_memory when it shrinks a thread's arena: measured), the CPU count.
SYSTEM_READ = ("/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache", "/etc/localtime",
               "/usr/share/zoneinfo", "/sys/devices/system/cpu", "/proc/sys/vm/max_map_count",
               "/proc/sys/vm/overcommit_memory", "/dev/urandom")


def ruleset(kind: str, *, state_dirs: Iterable[str] = (), socket_dirs: Iterable[str] = (),
            open_by_path: bool = False, devices: Iterable[str] = ()) -> Ruleset:
    """The files ``kind`` may use once it runs.

    ``state_dirs``: read, write, create and replace files in (xenstored's
    store).  ``socket_dirs``: bind and remove unix sockets in (an NBD
    export's directory, xenstored's socket directory).  ``open_by_path``: a
    blkback started without the toolstack's device channel must open its
    images by path, which it learns from xenstore only later: reading and
    writing files is then left to DAC (not handled), everything else still
    is.  ``devices``: device nodes it may open read-write (``/dev/net/tun``).
    """
    if kind not in KIND_SYSCALLS:
        raise ValueError(f"no confinement policy for kind {kind!r}")
    handled = ALL_FS
    if open_by_path:
        handled &= ~(FS.READ_FILE | FS.WRITE_FILE | FS.TRUNCATE)
    # Signals: a guest stops its workload, which runs outside its Landlock domain.
    scoped = SCOPE.ABSTRACT_UNIX_SOCKET | (0 if kind == "guest" else SCOPE.SIGNAL)
    rs = Ruleset(handled, handled_net=NET.BIND_TCP | NET.CONNECT_TCP, scoped=scoped)
    for p in [*_python_paths(), *SYSTEM_READ]:
        rs.allow(p, FS.READ)
    rs.allow("/proc/self", FS.READ)
    rs.allow("/dev/null", FS.READ_FILE | FS.WRITE_FILE)
    if kind == "blkback":
        rs.allow("/sys/dev/block", FS.READ)     # a block device's queue/write_cache
        rs.allow("/sys/devices", FS.READ)
    for d in devices:
        rs.allow(d, FS.READ_FILE | FS.WRITE_FILE | FS.IOCTL_DEV)
    for d in state_dirs:
        rs.allow(d, FS.STATE)
    for d in socket_dirs:
        rs.allow(d, FS.SOCKETS)
    return rs
