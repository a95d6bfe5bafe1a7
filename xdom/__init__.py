"""The checkout as it is imported: ``xdom.broker`` is ``broker/``, ``xdom.domains`` is ``domains/``, ...

The design card keeps broker/, domains/, backends/ and deploy/ at the top
level; pyproject.toml installs them as ``xdom.*`` through setuptools'
``package-dir``, which only the installed import hook knows.  This package
is for the tools that read the checkout without importing it (mypy, editors,
import-graph tests): its entries are relative symlinks to the top-level
folders.

At run time it must change nothing: when the checkout root is on
``sys.path`` (``python -m pytest`` or ``python -m xdom.deploy.demo`` run
from it) Python finds this package before the editable install's hook, so
its search path is the checkout root itself, and ``xdom.broker`` is loaded
from ``broker/__init__.py``, the very file the installed package maps it to
(never through the symlinks: ``__file__``, the Landlock view of xdom's own
files and every path built from them stay the same).
"""

import os as _os

__path__ = [_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))]
