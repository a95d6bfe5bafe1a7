"""Bytecode for the domain processes, written by the toolstack before it starts them.

Domains run under uids of their own with ``python -I``: they may read the
sources but not write ``__pycache__`` beside them, so without it each start
compiled every module it imports from source.  That was most of a guest's
start-up CPU (py-spy, 32 guests: 0.24 s of its 0.28 s in ``source_to_code``),
and with 100 guests on 2 CPUs it decided how long ``xdom up`` took.  The
supervisor can write there (it owns, or is root over, the checkout or the
installed package), so it compiles once; a module already compiled costs a
stat and a header read.  Where it cannot write, domains compile as before.
"""

from __future__ import annotations

import compileall
import logging
import os

__all__ = ["PACKAGES", "precompile"]

log = logging.getLogger("xdom.supervisor")

PACKAGES = ("broker", "backends", "domains", "deploy")      # what a domain process may import
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def precompile(root: str = _ROOT) -> bool:
    """Compile what is not compiled yet under ``root``'s packages; False if some could not be written."""
    ok = True
    for package in PACKAGES:
        path = os.path.join(root, package)
        if os.path.isdir(path):
            ok = bool(compileall.compile_dir(path, quiet=2, workers=1)) and ok
    if not ok:
        log.info("could not write bytecode under %s: domains compile their modules at each start", root)
    return ok
