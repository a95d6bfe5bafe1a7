"""``python -m xdom.backends.xenstored``: ``xdom xenstored`` with the options only this module has.

    python -m xdom.backends.xenstored --unix-socket /tmp/xs.sock --state-dir /tmp/xs-state --fsync

``--fsync``: every journal record is on stable storage (fdatasync) before
the replies it describes leave, so what a client was told survives a power
loss, not only a SIGKILL; the requests of one loop turn share one flush.
The same as ``XDOM_XENSTORED_FSYNC=1`` in the environment of ``xdom
xenstored`` (how a toolstack asks for it).  Needs ``--state-dir``.
"""

from __future__ import annotations

import os
import sys

from .server import FSYNC_ENV


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--fsync" in argv:
        argv.remove("--fsync")
        if "--state-dir" not in argv and not any(a.startswith("--state-dir=") for a in argv):
            print("xenstored: --fsync needs --state-dir", file=sys.stderr)
            return 2
        os.environ[FSYNC_ENV] = "1"
    from xdom.deploy.cli import main as cli_main
    return cli_main(["xenstored", *argv])


if __name__ == "__main__":
    sys.exit(main())
