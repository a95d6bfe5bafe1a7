"""A pytest plugin for a test run spread over many hosts (``-p fleet_report``): which host ran what.

On each worker (an xdist worker reached through an execnet gateway on a
host of the fleet) every test report carries the host's name, from
``$XDOM_FLEET_HOST`` (set where the host's execnet socketserver starts),
else the machine's name.  The controller gathers them into one summary at
the end of the run (a line per test, and a count per host), and with
``--fleet-report FILE`` writes them as JSON.
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

HOST_KEY = "fleet_host"
_ran: list[dict[str, Any]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fleet-report", default=None, metavar="FILE",
                     help="write which host ran which test (and its outcome) to FILE as JSON")


def this_host() -> str:
    return os.environ.get("XDOM_FLEET_HOST") or socket.gethostname()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    report.user_properties.append((HOST_KEY, this_host()))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        host = dict(report.user_properties).get(HOST_KEY, "?")
        gateway = getattr(getattr(report, "node", None), "gateway", None)     # xdist's worker, on the controller
        _ran.append({"test": report.nodeid, "host": host, "outcome": report.outcome,
                     "worker": gateway.id if gateway is not None else None})


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or not _ran:
        return
    tr = terminalreporter
    tr.section("which host ran what")
    for r in sorted(_ran, key=lambda r: (r["host"], r["test"])):
        tr.write_line(f"{r['host']:<10} {r['outcome']:<8} {r['test']}")
    per_host = Counter((r["host"], r["outcome"]) for r in _ran)
    hosts = sorted({r["host"] for r in _ran})
    tr.write_line("")
    for h in hosts:
        tr.write_line(f"{h}: " + ", ".join(f"{n} {o}" for (hh, o), n in sorted(per_host.items()) if hh == h))
    path = config.getoption("fleet_report")
    if path:
        with open(path, "w") as f:
            json.dump(_ran, f, indent=2)
