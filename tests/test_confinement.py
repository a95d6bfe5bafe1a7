"""Confinement of running domains (security issue 11): seccomp allow-lists and Landlock.

* the BPF builder, as a pure function, run on an interpreter of classic BPF here;
* filters installed in child processes: an allowed call works, a forbidden one kills with SIGSYS, a
  wrong-arch and an x32 call kill, clone3 gets ENOSYS and threads still start, a namespace clone kills;
* Landlock in a child: files outside the kind's set refused, TCP refused, signals outside refused;
* a guest's workload inherits none of the guest's confinement;
* live, under the supervisor: every kind reports its confinement in ``ps``; a domain that makes a
  forbidden syscall is killed by the kernel, the supervisor says so (with the syscall, from the
  kernel log) and its restart policy brings it back.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys

import pytest

from xdom.domains.confinement import landlock, policy
from xdom.domains.confinement.seccomp import (
    AUDIT_ARCH_X86_64,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_LOG,
    ArgBits,
    ArgIn,
    FilterSpec,
    build_filter,
)
from xdom.domains.confinement.syscalls import NR

PY = sys.executable
AUDIT_ARCH_I386 = 0x40000003
CLONE_THREAD_FLAGS = 0x3D0F00          # what glibc's pthread_create passes
CLONE_NEWUSER = 0x10000000
FORK_FLAGS = 0x01200011                 # what glibc's fork passes: CHILD_CLEARTID|CHILD_SETTID|SIGCHLD
TIOCSTI = 0x5412

needs_x86_64 = pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filters are built for x86_64")


# ---- the builder, pure -------------------------------------------------------------------------

def run_bpf(prog: bytes, nr: int, arch: int = AUDIT_ARCH_X86_64, args: tuple[int, ...] = ()) -> int:
    """What the kernel would answer: a classic BPF interpreter for the opcodes the builder emits."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    a = pc = 0
    for _ in range(len(insns) + 1):
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            a = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x54:
            a &= k
            pc += 1
        elif code in (0x15, 0x35, 0x45):
            taken = a == k if code == 0x15 else a >= k if code == 0x35 else bool(a & k)
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("no return")


def test_the_builder_allows_refuses_and_checks_arguments() -> None:
    spec = FilterSpec.by_name({"read": None, "write": None, "clone": ArgBits(0, CLONE_NEWUSER, 0x10100),
                               "ioctl": ArgIn(1, frozenset({0x5401}))}, {"clone3": 38})
    prog = build_filter(spec)
    assert len(prog) % 8 == 0
    assert run_bpf(prog, NR["read"]) == SECCOMP_RET_ALLOW
    assert run_bpf(prog, NR["ptrace"]) == SECCOMP_RET_KILL_PROCESS
    assert run_bpf(prog, NR["clone3"]) == SECCOMP_RET_ERRNO | 38
    assert run_bpf(prog, NR["clone"], args=(CLONE_THREAD_FLAGS,)) == SECCOMP_RET_ALLOW
    assert run_bpf(prog, NR["clone"], args=(CLONE_THREAD_FLAGS | CLONE_NEWUSER,)) == SECCOMP_RET_KILL_PROCESS
    assert run_bpf(prog, NR["clone"], args=(FORK_FLAGS,)) == SECCOMP_RET_KILL_PROCESS          # required bits
    assert run_bpf(prog, NR["ioctl"], args=(0, 0x5401)) == SECCOMP_RET_ALLOW
    assert run_bpf(prog, NR["ioctl"], args=(0, TIOCSTI)) == SECCOMP_RET_KILL_PROCESS
    # another architecture, and x32 numbers, are fatal whatever the number
    assert run_bpf(prog, NR["read"], arch=AUDIT_ARCH_I386) == SECCOMP_RET_KILL_PROCESS
    assert run_bpf(prog, NR["read"] | 0x40000000) == SECCOMP_RET_KILL_PROCESS
    # the debugging mode logs what it does not list, but still kills a foreign arch
    logged = build_filter(FilterSpec.by_name({"read": None}, default=SECCOMP_RET_LOG))
    assert run_bpf(logged, NR["ptrace"]) == SECCOMP_RET_LOG
    assert run_bpf(logged, NR["read"], arch=AUDIT_ARCH_I386) == SECCOMP_RET_KILL_PROCESS


def test_the_builder_scales_and_rejects_nonsense() -> None:
    everything = build_filter(FilterSpec({nr: None for nr in range(470)}))      # jumps never overflow
    assert all(run_bpf(everything, nr) == SECCOMP_RET_ALLOW for nr in (0, 200, 469))
    assert run_bpf(everything, 470) == SECCOMP_RET_KILL_PROCESS
    with pytest.raises(ValueError):
        FilterSpec.by_name({"no_such_call": None})
    with pytest.raises(ValueError):
        build_filter(FilterSpec({0: None}, {0: 1}))          # allowed and refused
    with pytest.raises(ValueError):
        build_filter(FilterSpec({0x40000001: None}))


def test_every_kind_has_a_filter_without_the_dangerous_calls() -> None:
    for kind in policy.KINDS:
        spec = policy.filter_spec(kind)
        prog = build_filter(spec)
        for name in policy.NEVER:
            if name in NR:
                assert run_bpf(prog, NR[name]) == SECCOMP_RET_KILL_PROCESS, (kind, name)
        for name in policy.syscalls_of(kind) - {"socket"}:
            assert run_bpf(prog, NR[name]) == SECCOMP_RET_ALLOW, (kind, name)
        # threads, not namespaces; unix sockets only, where a kind makes sockets at all
        assert run_bpf(prog, NR["clone"], args=(CLONE_THREAD_FLAGS,)) == SECCOMP_RET_ALLOW
        assert run_bpf(prog, NR["clone"], args=(CLONE_THREAD_FLAGS | CLONE_NEWUSER,)) == SECCOMP_RET_KILL_PROCESS
        assert run_bpf(prog, NR["clone"], args=(FORK_FLAGS,)) == SECCOMP_RET_KILL_PROCESS
        assert run_bpf(prog, NR["socket"], args=(socket.AF_UNIX,)) == (
            SECCOMP_RET_ALLOW if "socket" in policy.syscalls_of(kind) else SECCOMP_RET_KILL_PROCESS)
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET):
            assert run_bpf(prog, NR["socket"], args=(family,)) == SECCOMP_RET_KILL_PROCESS, (kind, family)
        assert run_bpf(prog, NR["ioctl"], args=(0, TIOCSTI)) == SECCOMP_RET_KILL_PROCESS
    with pytest.raises(ValueError, match="never allowed"):
        policy.filter_spec("blkback", extra=["ptrace"])
    with pytest.raises(ValueError):
        policy.filter_spec("no-such-kind")


def test_the_syscall_table_matches_the_kernel_headers() -> None:
    header = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"
    if not os.path.exists(header):
        pytest.skip("no asm/unistd_64.h (linux-libc-dev)")
    found = dict(re.findall(r"#define __NR_(\w+) (\d+)", open(header).read()))
    assert found and all(NR[name] == int(nr) for name, nr in found.items())


# ---- installed, in child processes -------------------------------------------------------------

CHILD = '''
import ctypes, mmap, os, sys, threading
from xdom.domains import confinement
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
confinement.lock_down(sys.argv[1])
print("locked", flush=True)
what = sys.argv[2]
if what == "thread":
    t = threading.Thread(target=lambda: print("thread ran", flush=True)); t.start(); t.join()
elif what == "ptrace":
    libc.ptrace(0, 0, 0, 0)
elif what == "x32":
    libc.syscall(ctypes.c_long(0x40000000 + 39))
elif what == "fork":
    os.fork()
elif what == "newuser":
    libc.syscall(ctypes.c_long(56), ctypes.c_long(0x10000000 | 17), ctypes.c_long(0), ctypes.c_long(0),
                 ctypes.c_long(0), ctypes.c_long(0))
elif what == "int80":
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])      # mov eax, 20 (i386 getpid); int 0x80; ret
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    print("int80 gave", ctypes.CFUNCTYPE(ctypes.c_int)(addr)(), flush=True)
print("alive", flush=True)
'''


def _child(kind: str, what: str, mode: str = "kill") -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-c", CHILD, kind, what], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, XDOM_CONFINE=mode))


@needs_x86_64
def test_an_allowed_call_works_and_threads_start_without_clone3() -> None:
    res = _child("domain", "thread")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["locked", "thread", "ran", "alive"]


@needs_x86_64
@pytest.mark.parametrize("what", ["ptrace", "x32", "newuser", "fork"])
def test_a_forbidden_call_kills_the_process(what: str) -> None:
    res = _child("domain", what)
    assert res.returncode == -signal.SIGSYS, (res.returncode, res.stderr)
    assert res.stdout.split() == ["locked"]


@needs_x86_64
def test_log_mode_lets_a_forbidden_call_through() -> None:
    res = _child("domain", "ptrace", mode="log")
    assert res.returncode == 0 and res.stdout.split() == ["locked", "alive"], res.stderr


@needs_x86_64
def test_an_i386_call_from_a_64_bit_domain_kills_it() -> None:
    plain = subprocess.run([PY, "-c", CHILD.replace("confinement.lock_down(sys.argv[1])", ""), "domain", "int80"],
                           capture_output=True, text=True, timeout=60)
    if plain.returncode != 0:
        pytest.skip("this kernel runs no i386 syscalls (no IA32 emulation)")
    res = _child("domain", "int80")
    assert res.returncode == -signal.SIGSYS and "int80 gave" not in res.stdout, (res.returncode, res.stderr)


def test_confinement_off_installs_nothing() -> None:
    res = subprocess.run([PY, "-c", "from xdom.domains import confinement; print(confinement.lock_down('domain'))"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, XDOM_CONFINE="off"))
    assert res.returncode == 0 and res.stdout.strip() == "none"


# ---- Landlock, in a child ----------------------------------------------------------------------

LANDLOCKED = '''
import errno, os, signal, socket, sys
from xdom.domains import confinement
confinement.restrict_files(sys.argv[1], state_dirs=[sys.argv[2]])
def attempt(what, f):
    try:
        f()
        print(what, "ok")
    except OSError as e:
        print(what, errno.errorcode[e.errno])
attempt("secret", lambda: open(sys.argv[3]).read())
attempt("state", lambda: open(os.path.join(sys.argv[2], "db"), "w").write("x"))
attempt("stdlib", lambda: open(os.__file__).read())
attempt("devnull", lambda: open(os.devnull, "w").write("x"))
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", 9), timeout=2))
attempt("signal", lambda: os.kill(os.getppid(), 0))
print(confinement.report())
'''


def test_landlock_keeps_a_domain_to_its_files(tmp_path) -> None:
    if landlock.abi_version() < 6:
        pytest.skip("needs Landlock ABI 6 (scopes)")
    state = tmp_path / "state"
    state.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("guest memory, say")
    res = subprocess.run([PY, "-c", LANDLOCKED, "xenstored", str(state), str(secret)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = dict(line.split(" ", 1) for line in res.stdout.splitlines()[:-1])
    assert got == {"secret": "EACCES", "state": "ok", "stdlib": "ok", "devnull": "ok", "exec": "EACCES",
                   "tcp": "EACCES", "signal": "EPERM"}
    assert res.stdout.splitlines()[-1] == f"landlock=abi{landlock.abi_version()}"


def test_a_blkback_started_by_hand_may_still_open_images_by_path(tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    code = ("import os, sys; from xdom.domains import confinement; "
            "confinement.restrict_files('blkback', open_by_path=True); os.close(os.open(sys.argv[1], os.O_RDWR)); "
            "os.execv('/bin/true', ['true'])")
    res = subprocess.run([PY, "-c", code, str(image)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "PermissionError" in res.stderr, res.stderr     # opened it; exec refused


# ---- a guest's workload is not confined ---------------------------------------------------------

GUEST_CHILD = '''
import sys
from xdom.domains import confinement
from xdom.domains.guest import HeldWorkload
w = HeldWorkload(["sh", "-c", "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status > " + sys.argv[1]])
confinement.restrict_files("guest")
confinement.lock_down("guest")
w.start()
sys.exit(w.wait())
'''


def test_a_guests_workload_inherits_none_of_its_confinement(tmp_path) -> None:
    out = tmp_path / "status"
    res = subprocess.run([PY, "-c", GUEST_CHILD, str(out)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_text().split() == ["NoNewPrivs:", "0", "Seccomp:", "0"]


# ---- live, under the supervisor ----------------------------------------------------------------

BAD_PROGRAM = '''
import ctypes, signal, sys, time
from xdom.domains import confinement
from xdom.domains.xenhost import connect
libc = ctypes.CDLL(None)
told = []
signal.signal(signal.SIGUSR1, lambda *_: told.append(1))
host = connect()
confinement.lock_down("domain")
while not told:
    time.sleep(0.02)
libc.ptrace(0, 0, 0, 0)        # PTRACE_TRACEME: never allowed in a domain
'''


@needs_x86_64
def test_a_domain_making_a_forbidden_syscall_is_killed_and_restarted(run_dir: str) -> None:
    from test_supervisor import XS, Host
    prog = os.path.join(run_dir, "bad.py")
    with open(prog, "w") as f:
        f.write(BAD_PROGRAM)
    text = XS + (f'[[domain]]\nname = "bad"\nkind = "program"\ncommand = ["{PY}", "{prog}"]\n'
                 'restart = "on-failure"\nrestart_backoff = 0.05\n')
    with Host(run_dir, text) as h:
        ps = h.ps()
        xs = ps["xs"]["confinement"]
        assert xs["summary"] == f"seccomp=kill:xenstored landlock=abi{landlock.abi_version()}"
        assert xs["seccomp_filters"] == 1 and xs["no_new_privs"]
        first = h.wait("bad", "confined", confinement=lambda c: c is not None and c["seccomp"] == "filter")
        os.kill(first["pid"], signal.SIGUSR1)
        r = h.wait("bad", "restarted", state="running", generation=2)
        assert r["restarts"] == 1 and r["pid"] != first["pid"]
        assert r["last_exit"].startswith("killed by SIGSYS (its seccomp filter refused ")
        if os.access("/dev/kmsg", os.R_OK) and _kernel_logs_seccomp():
            assert r["last_exit"] == "killed by SIGSYS (its seccomp filter refused syscall 101 (ptrace))"
        assert [e for e in h.journal("bad", "exit") if "seccomp" in e.detail]
        log = open(h.layout.log_path("bad")).read()
        assert "killed by SIGSYS" in log


def _kernel_logs_seccomp() -> bool:
    try:
        return "kill_process" in open("/proc/sys/kernel/seccomp/actions_logged").read().split()
    except OSError:
        return False


def test_ps_shows_no_confinement_for_a_dead_or_unconfined_process() -> None:
    from xdom.deploy.confined import confinement_of, parse_ready
    assert confinement_of(None, "seccomp=kill:guest") is None
    mine = confinement_of(os.getpid(), "seccomp=kill:guest landlock=abi7")     # a claim the kernel contradicts
    assert mine is not None and mine["seccomp"] is None and mine["landlock"] is None and mine["summary"] == "none"
    assert parse_ready(b"ready seccomp=kill:blkback landlock=abi7\n") == "seccomp=kill:blkback landlock=abi7"
    assert parse_ready(b"ready\n") == "" and parse_ready(b"garbage x=y") == ""
    from xdom.deploy.watch_cli import _confined
    assert _confined(None) == "-" and _confined(mine) == "none"
    assert _confined({"seccomp": "kill:guest", "landlock": "abi7"}) == "kill:guest+landlock7"
    assert _confined({"seccomp": None, "landlock": None}) == "none"
