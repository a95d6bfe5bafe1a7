"""How an ``xdom`` command finds a running supervisor and asks it something.

The commands of :mod:`xdom.deploy.supervisor_cli` name a host by
``--run-dir``, by ``--topology`` (the run directory ``up`` would choose for
it), or not at all (the only one running under the default directory):
:func:`resolve_run_dir`.  They reach its supervisor over the control
channel (``deploy/control.py``) through :func:`request`, which believes the
control socket only as the supervisor made it (:func:`control_socket`), and
end with a :class:`CommandError` carrying the exit status scripts rely on:
0 done; 1 an error (a domain did not start, a request was refused, a
timeout); 2 a usage or topology error, nothing started; 3 nothing running.
``xdom xenstore`` finds a host's xenstored the same way
(:func:`xenstored_endpoint`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

from .control import ControlClient, ControlError, endpoint_for
from .exit_codes import EXIT_ERROR, EXIT_NOTHING, EXIT_OK, EXIT_USAGE
from .rundir import (
    STATE_FILE,
    Layout,
    UntrustedPath,
    default_base,
    default_dirs,
    find_supervisors,
    find_unsupervised,
    running_pid,
    topology_name,
)

if TYPE_CHECKING:
    from .topology import Topology

__all__ = ["EXIT_ERROR", "EXIT_NOTHING", "EXIT_OK", "EXIT_USAGE", "CommandError", "client", "control_socket",
           "dirs_for", "load", "request", "resolve_run_dir", "say", "xenstored_endpoint", "xenstored_socket"]


class CommandError(Exception):
    """Ends a command with ``code`` after printing the message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def say(text: str, out: TextIO = sys.stdout) -> None:
    """A line for the user, flushed at once (the progress of a long command shows as it happens)."""
    print(text, file=out, flush=True)


def load(path: str) -> Topology:
    from .topology import TopologyError
    from .topology_parse import load_topology
    try:
        return load_topology(path)
    except TopologyError as e:
        raise CommandError(EXIT_USAGE, f"{e}") from None


def dirs_for(topo: Topology, state_dir: str | None, run_dir: str | None) -> tuple[str, str]:
    """Command line, then the topology's [host] table, then the defaults for its name."""
    d_state, d_run = default_dirs(topology_name(topo.source))
    return (os.path.abspath(state_dir or topo.host.state_dir or d_state),
            os.path.abspath(run_dir or topo.host.run_dir or d_run))


def resolve_run_dir(args: argparse.Namespace, unsupervised: bool = False) -> str:
    """The host's run directory: ``--run-dir``, ``--topology``, or the only one running (with
    ``unsupervised``, counting hosts whose supervisor died: ``ps`` and ``down`` deal with those)."""
    if args.run_dir:
        return os.path.abspath(args.run_dir)
    if args.topology:
        return dirs_for(load(args.topology), None, None)[1]
    found = find_supervisors()
    if unsupervised:
        found = sorted({*found, *find_unsupervised()})
    if len(found) == 1:
        return found[0]
    if not found:
        raise CommandError(EXIT_NOTHING, f"no supervisor is running under {default_base()}; give --run-dir or "
                                         f"--topology")
    raise CommandError(EXIT_USAGE, f"{len(found)} supervisors are running ({', '.join(found)}); say which with "
                                   f"--run-dir")


def xenstored_socket(socket: str | None, run_dir: str | None, topology: str | None) -> str | None:
    """The socket ``xdom xenstore`` talks to: ``--socket``; the host named by ``--run-dir`` or
    ``--topology``; ``$XENSTORED_PATH``; the only host running.  None: Xen's default socket."""
    return xenstored_endpoint(socket, run_dir, topology)[0]


def xenstored_endpoint(socket: str | None, run_dir: str | None, topology: str | None) -> tuple[str | None, int | None]:
    """:func:`xenstored_socket`, and for a host's xenstored the uid its server must run as (else None).

    A host's ``xenstored.sock`` is believed only as the supervisor made it: a
    symlink of root's (or this uid's) in a trusted run directory, to
    ``xenstored/socket``; that directory's owner is the xenstore domain's
    uid, which the caller checks the server against (``SO_PEERCRED``).
    Raises UntrustedPath otherwise.
    """
    if socket:
        return socket, None
    if not run_dir and not topology and os.environ.get("XENSTORED_PATH"):
        return None, None
    try:
        found = resolve_run_dir(argparse.Namespace(run_dir=run_dir, topology=topology))
    except CommandError as e:
        if e.code == EXIT_NOTHING:
            return None, None       # no host here: Xen's default socket, as xenstore-ls would use
        raise
    if (run_dir or topology) and running_pid(found) is None:
        raise CommandError(EXIT_NOTHING, f"no supervisor is running in {found}")
    from xdom.broker.pathtrust import check_file
    lay = Layout("/", found)
    try:
        check_file(lay.xenstored_link, "symlink", f"the xenstored link {lay.xenstored_link}")
    except FileNotFoundError:
        raise CommandError(EXIT_ERROR, f"the host in {found} has no xenstored ({lay.xenstored_link})") from None
    want = os.path.relpath(lay.xenstored_socket, found)
    if os.readlink(lay.xenstored_link) != want:
        raise UntrustedPath(f"refusing {lay.xenstored_link}: it points to {os.readlink(lay.xenstored_link)!r}, "
                            f"not to {want!r}")
    import stat
    st = os.lstat(lay.xenstored_run)
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedPath(f"refusing {lay.xenstored_run}: not a directory")
    return lay.xenstored_link, st.st_uid


def client(run_dir: str, timeout: float) -> ControlClient:
    if running_pid(run_dir) is None:      # which checked the run directory: only root (or we) can write it
        if os.path.exists(os.path.join(run_dir, STATE_FILE)):
            raise CommandError(EXIT_NOTHING, f"no supervisor is running in {run_dir}: its host runs on without one "
                                             f"(xdom ps shows what is alive; xdom up TOPOLOGY adopts it, xdom down "
                                             f"stops it)")
        raise CommandError(EXIT_NOTHING, f"no supervisor is running in {run_dir}")
    return ControlClient(endpoint_for(control_socket(run_dir)), timeout)


def control_socket(run_dir: str) -> str:
    """``supervisor.sock``, believed only as a socket of root's (or ours) in a trusted run directory."""
    from xdom.broker.pathtrust import check_file
    path = Layout("/", run_dir).control_socket
    try:
        check_file(path, "socket", f"the control socket {path}")
    except FileNotFoundError:
        raise CommandError(EXIT_ERROR, f"the supervisor in {run_dir} has no control socket ({path}) yet") from None
    return path


def request(run_dir: str, timeout: float, op: str, **fields: Any) -> dict[str, Any]:
    with client(run_dir, timeout) as c:
        try:
            return c.request(op, **fields)
        except ControlError as e:
            raise CommandError(EXIT_ERROR, f"{e.message} ({e.errno_name})") from None
        except TimeoutError as e:
            raise CommandError(EXIT_ERROR, str(e)) from None
