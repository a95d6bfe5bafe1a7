"""`xdom xenstore read|write|ls|rm|watch` through our own client."""

from __future__ import annotations

import subprocess
import sys

from xs_fixtures import start_xenstored


def xdom(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", "xenstore", *args],
                          capture_output=True, text=True, timeout=30)


def test_write_read_ls_rm_watch(run_dir: str) -> None:
    xsd = start_xenstored(run_dir)
    try:
        s = ["--socket", xsd.socket_path]
        assert xdom("write", "/cli/a", "1", "/cli/b/c", "two", *s).returncode == 0
        assert xdom("read", "/cli/a", "/cli/b/c", *s).stdout.splitlines() == ["1", "two"]
        assert xdom("ls", "/cli", *s).stdout.splitlines() == [
            '/cli = ""', '/cli/a = "1"', '/cli/b = ""', '/cli/b/c = "two"']
        watch = subprocess.Popen([sys.executable, "-m", "xdom.deploy.cli", "xenstore", "watch", "/cli/a",
                                  "--count", "2", *s], stdout=subprocess.PIPE, text=True)
        try:
            assert watch.stdout is not None
            assert watch.stdout.readline().strip() == "/cli/a"          # the first event
            assert xdom("write", "/cli/a", "changed", *s).returncode == 0
            assert watch.stdout.readline().strip() == "/cli/a"
            assert watch.wait(timeout=10) == 0
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
        assert xdom("rm", "/cli/b", *s).returncode == 0
        missing = xdom("read", "/cli/b/c", *s)
        assert missing.returncode == 1 and "ENOENT" in missing.stderr
        assert xdom("write", "/odd", *s).returncode == 2
    finally:
        xsd.stop()
    assert xdom("read", "/x", "--socket", xsd.socket_path).returncode == 3     # nobody there
