"""The smallest real domain: connect to the broker, then wait to be stopped.

``python3 -m xdom.domains.idle`` as a topology ``program`` (see
deploy/examples/minimal.toml): it says hello with its token, registers its
memory, and shuts down cleanly on SIGTERM, so the broker records a
shutdown rather than a crash.
"""

from __future__ import annotations

import signal
import threading

from .xenhost import connect


def main() -> None:
    host = connect()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    host.shutdown("poweroff")
    host.close()


if __name__ == "__main__":
    main()
