import sys

from xdom.domains import startup

startup.begin()
from .server import main  # noqa: E402  (after begin(): the imports are a phase of the start-up)

sys.exit(main())
