"""deploy/bytecode.py: the toolstack writes the bytecode that domains, under their own uids, cannot."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys

from xdom.deploy.bytecode import PACKAGES, precompile


def make_tree(root: str) -> str:
    pkg = os.path.join(root, PACKAGES[0])
    os.makedirs(pkg)
    for name, text in (("__init__.py", ""), ("mod.py", "VALUE = 42\n")):
        with open(os.path.join(pkg, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(pkg, name), 0o644)
    return pkg


def test_bytecode_is_written_readable_by_others_and_used_by_an_isolated_interpreter(run_dir: str) -> None:
    pkg = make_tree(run_dir)
    assert precompile(run_dir) is True
    pyc = importlib.util.cache_from_source(os.path.join(pkg, "mod.py"))
    assert os.path.exists(pyc)
    assert stat.S_IMODE(os.stat(pyc).st_mode) & 0o044 == 0o044          # a domain's uid may read it
    # an interpreter that may not write bytecode (-B) still loads the compiled module, not its source: with the
    # source's text replaced (same size and mtime), the module keeps the compiled value
    src = os.path.join(pkg, "mod.py")
    st = os.stat(src)
    with open(src, "w") as f:
        f.write("VALUE = 99\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = subprocess.run([sys.executable, "-I", "-B", "-c", f"import sys; sys.path.insert(0, {run_dir!r}); "
                          f"from {PACKAGES[0]} import mod; print(mod.VALUE)"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "42", out.stderr
    # and a second call with nothing stale writes nothing
    before = os.stat(pyc).st_mtime_ns
    assert precompile(run_dir) is True
    assert os.stat(pyc).st_mtime_ns == before
