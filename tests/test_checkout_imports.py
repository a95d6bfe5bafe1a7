"""The xdom/ folder at the checkout root (symlinks for mypy and editors) changes nothing at run time.

Run from the checkout root, Python finds xdom/__init__.py before the
editable install's import hook; from anywhere else (a domain process runs
in /) it finds the hook.  Both must load every module from the same file:
broker/, domains/, ... as they are, never through the symlinks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import importlib, json
names = ["xdom.broker.server", "xdom.domains.abi", "xdom.domains.confinement.policy", "xdom.backends.blkback",
         "xdom.deploy.cli"]
print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))
"""


def _files(cwd: str) -> dict[str, str]:
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def test_same_files_from_the_root_and_elsewhere() -> None:
    here, there = _files(ROOT), _files("/")
    assert here == there
    for name, path in here.items():
        assert "/xdom/" not in path.removeprefix(ROOT), (name, path)
        assert os.path.realpath(path) == path or os.path.realpath(ROOT) != ROOT, (name, path)
        assert path.startswith(os.path.join(ROOT, name.split(".")[1]) + os.sep), (name, path)


def test_symlinks_name_the_top_level_folders() -> None:
    for pkg in ("broker", "domains", "backends", "deploy"):
        link = os.path.join(ROOT, "xdom", pkg)
        assert os.path.islink(link) and os.readlink(link) == os.path.join("..", pkg)
