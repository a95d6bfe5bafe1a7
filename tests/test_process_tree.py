"""deploy/process_tree.py: one read of the process table answers every domain's descendants."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import wait_until

from xdom.deploy.process_tree import ProcessTree

# A child that starts a grandchild, prints both pids and sleeps until its stdin closes.
TWO_LEVELS = (
    "import subprocess, sys\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)\n"
    "print(g.pid, flush=True)\n"
    "sys.stdin.read()\n"
    "g.stdin.close(); g.wait()\n"
)


def test_descendants_are_children_and_grandchildren_and_nothing_else() -> None:
    child = subprocess.Popen([sys.executable, "-c", TWO_LEVELS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        tree = ProcessTree()
        assert tree.descendants(child.pid) == [grandchild]
        mine = tree.descendants(os.getpid())
        assert {child.pid, grandchild, other.pid} <= set(mine)
        assert mine.index(child.pid) < mine.index(grandchild)          # parents before their children
        assert tree.descendants(grandchild) == []
        assert ProcessTree().descendants(2 ** 22 + 1) == []             # no such pid: nothing, no error
    finally:
        for p in (child, other):
            assert p.stdin is not None
            p.stdin.close()
            p.wait(10)
    wait_until(lambda: child.pid not in ProcessTree().descendants(os.getpid()), 10, "the child to be gone")
