"""C programs built against Xen's own xen/io/netif.h: the reference the netif ABI tests compare with.

The reference is always the C compiler's view of /usr/include/xen/io/netif.h
(Debian's libxen-dev); a test builds a small program from it with
:func:`build_c` and reads what it prints with :func:`run_c`.  Used by
test_netif_abi.py (constants, layouts, Toeplitz) and test_netif_rings.py
(ring pages shared with C peers).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

HEADER = "/usr/include/xen/io/netif.h"

needs_headers = pytest.mark.skipif(
    not os.path.exists(HEADER) or not shutil.which("gcc"),
    reason=f"needs {HEADER} (Debian's libxen-dev) and gcc (make test installs them as root)")

# ring.h with __XEN_INTERFACE_VERSION__ unset maps xen_mb() and friends onto
# mb()/rmb()/wmb(), which a user-space program has to supply.
PRELUDE = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#define mb()  __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
"""


@functools.cache
def _m32_works() -> bool:
    """Whether gcc can build and run 32-bit programs here (gcc-multilib)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "p.c")
        with open(src, "w") as f:
            f.write("#include <stdio.h>\nint main(void) { return 0; }\n")
        exe = os.path.join(d, "p")
        if subprocess.run(["gcc", "-m32", "-o", exe, src], capture_output=True).returncode:
            return False
        return subprocess.run([exe], capture_output=True).returncode == 0


def build_c(tmp_path: Path, name: str, body: str, arch: str = "-m64", defines: str = "") -> str:
    """Compile ``body`` after the prelude and ``#include <xen/io/netif.h>``; the executable's path."""
    if arch == "-m32" and not _m32_works():
        pytest.skip("gcc -m32 cannot build here (no gcc-multilib)")
    src = tmp_path / f"{name}.c"
    exe = tmp_path / name
    src.write_text(PRELUDE + defines + "#include <xen/io/netif.h>\n" + body)
    res = subprocess.run(["gcc", "-Wall", "-O1", arch, "-o", str(exe), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, f"gcc failed on {src}:\n{res.stderr}"
    return str(exe)


def run_c(exe: str, *args: str, stdin: str = "") -> str:
    """Run a built program to its end; what it printed (it must exit 0)."""
    res = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout
