"""The exit statuses of every ``xdom`` command, in one place (README: "Exit statuses").

3 means the same thing to a script whichever command it ran: the host (or a remote one) is not there to
answer: not running, its supervisor gone, or unreachable over the network.
"""

from __future__ import annotations

__all__ = ["EXIT_ERROR", "EXIT_NOTHING", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE"]

EXIT_OK = 0              # done
EXIT_ERROR = 1           # the command failed; it said why
EXIT_USAGE = 2           # refused before anything was done: bad arguments, a topology or limit refused
EXIT_UNREACHABLE = 3     # no host to ask: nothing running in that run directory, or a remote host unreachable
EXIT_NOTHING = EXIT_UNREACHABLE
