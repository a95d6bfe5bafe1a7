"""Static checks: an undefined name in the broker's loop is a dead hypervisor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing() -> None:
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    res = subprocess.run([ruff, "check", "broker", "domains", "backends", "deploy", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


MODULE_LINES = 700          # issue 16: a module a newcomer can read through; split along a seam beyond this


def test_no_module_over_700_lines() -> None:
    """Every Python module of the project (sources, tests, benchmarks) stays under MODULE_LINES lines."""
    long: list[str] = []
    for top in ("broker", "domains", "backends", "deploy", "tests", "benchmarks"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        n = sum(1 for _ in f)
                    if n > MODULE_LINES:
                        long.append(f"{os.path.relpath(path, ROOT)}: {n} lines")
    assert not long, f"modules over {MODULE_LINES} lines (split them along a seam): {', '.join(sorted(long))}"
