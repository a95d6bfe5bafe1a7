"""The floor of bench_broker's event-channel round trip: a C eventfd ping-pong between two forked processes.

Compiled with the system's gcc at run time (absent: the benchmark prints
why and goes on without a floor).
"""

from __future__ import annotations

import array
import os
import shutil
import subprocess
import textwrap

C_PINGPONG = textwrap.dedent(r"""
    #define _GNU_SOURCE
    #include <sched.h>
    #include <stdint.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <sys/eventfd.h>
    #include <sys/wait.h>
    #include <time.h>
    #include <unistd.h>

    static void xread(int fd) { uint64_t v; if (read(fd, &v, 8) != 8) _exit(3); }
    static void xwrite(int fd) { uint64_t v = 1; if (write(fd, &v, 8) != 8) _exit(4); }
    static long long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                                 return t.tv_sec * 1000000000LL + t.tv_nsec; }

    static void pin(int cpu) { cpu_set_t c; if (cpu < 0) return; CPU_ZERO(&c); CPU_SET(cpu, &c);
                               if (sched_setaffinity(0, sizeof c, &c)) _exit(6); }

    int main(int argc, char **argv) {
        if (argc != 5) return 2;
        int warm = atoi(argv[1]), n = atoi(argv[2]);
        pin(atoi(argv[3]));
        int ab = eventfd(0, EFD_CLOEXEC), ba = eventfd(0, EFD_CLOEXEC);
        if (ab < 0 || ba < 0 || n <= 0) return 1;
        long long *s = malloc(sizeof *s * n);
        if (!s) return 1;
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) { pin(atoi(argv[4])); for (int i = 0; i < warm + n; i++) { xread(ab); xwrite(ba); } _exit(0); }
        for (int i = 0; i < warm; i++) { xwrite(ab); xread(ba); }
        for (int i = 0; i < n; i++) { long long t0 = now(); xwrite(ab); xread(ba); s[i] = now() - t0; }
        int st;
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st)) return 5;
        for (int i = 0; i < n; i++) printf("%lld\n", s[i]);   /* one round trip (ns) a line */
        return 0;
    }
""")


def compile_c_pingpong(d: str) -> str:
    """Path of the compiled C ping-pong, or raises RuntimeError saying why not."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found")
    src, exe = os.path.join(d, "pingpong.c"), os.path.join(d, "pingpong")
    with open(src, "w") as f:
        f.write(C_PINGPONG)
    cc = subprocess.run([gcc, "-O2", "-o", exe, src], capture_output=True, text=True, timeout=60)
    if cc.returncode != 0:
        raise RuntimeError(f"gcc failed: {cc.stderr.strip()[:200]}")
    return exe


def run_c_pingpong(exe: str, warmup: int, iters: int, cpus: tuple[int, int]) -> array.array:
    run = subprocess.run([exe, str(warmup), str(iters), str(cpus[0]), str(cpus[1])], capture_output=True,
                         text=True, timeout=120)
    if run.returncode != 0:
        raise RuntimeError(f"C ping-pong exited with {run.returncode}")
    return array.array("q", map(int, run.stdout.split()))
