"""The NBD server with real clients on a real socket.

The programs people will point at the export -- nbdinfo, qemu-img,
qemu-io, nbdcopy, fio's libnbd engine -- against a FileBlockDevice, plus a
raw socket client for the hostile cases no well-behaved tool produces
(disconnects mid-request, bad magic, floods, a client that stops reading),
and the socket file's lifetime.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from nbd_serving import RawClient, nbdinfo_json, need, run, serving, short_sock_dir, uri
from nbd_wire import MiB, opt, req

from xdom.domains.nbd.server import NbdServer
from xdom.domains.nbd.wire import MAX_BLOCK_SIZE, Cmd, CmdFlag, NbdErr, Opt

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with short_sock_dir() as d:
        yield d


def test_nbdinfo_reports_size_block_sizes_and_flags(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo")
    with serving(tmp_path, sock_dir, size=8 * MiB + 3 * 512) as (_srv, _img, sock):
        e = nbdinfo_json(sock)
        assert e["export-size"] == 8 * MiB + 3 * 512
        assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == \
            (512, 4096, 32 * MiB)
        assert e["is_read_only"] is False
        assert e["can_flush"] and e["can_fua"] and e["can_trim"] and e["can_zero"]
        assert e["can_multi_conn"] is True                 # FileBlockDevice shares one page cache
        assert not e["can_df"] and not e["can_fast_zero"] and not e["can_cache"]


def test_nbdinfo_list_and_named_exports(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo")
    with serving(tmp_path, sock_dir, export_name="vda") as (_srv, _img, sock):
        listed = json.loads(run("nbdinfo", "--list", "--json", uri(sock)).stdout)
        assert [e["export-name"] for e in listed["exports"]] == ["vda"]
        assert nbdinfo_json(sock, "vda")["export-size"] == 8 * MiB
        res = run("nbdinfo", uri(sock, "nope"), ok=False)      # NBD_REP_ERR_UNKNOWN
        assert res.returncode != 0


def test_4096_byte_sectors_advertise_min_block_4096_and_qemu_obeys(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo", "qemu-io")
    content = os.urandom(4 * MiB)
    with serving(tmp_path, sock_dir, content=content, sector_size=4096) as (_srv, img, sock):
        e = nbdinfo_json(sock)
        assert (e["block_size_minimum"], e["block_size_preferred"]) == (4096, 4096)
        # A 512-byte write is legal for qemu only as read-modify-write of 4 KiB.
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 512 512", uri(sock))
        with open(img, "rb") as f:
            got = f.read()
        assert got == content[:512] + b"\x5a" * 512 + content[1024:]


def test_qemu_img_convert_out_of_the_export_is_byte_identical(tmp_path: Any, sock_dir: str) -> None:
    need("qemu-img")
    content = os.urandom(8 * MiB + 5 * 512)
    with serving(tmp_path, sock_dir, content=content) as (_srv, _img, sock):
        out = tmp_path / "out.raw"
        run("qemu-img", "convert", "-O", "raw", uri(sock), str(out))
        assert out.read_bytes() == content


def test_nbdcopy_into_the_export_then_compare(tmp_path: Any, sock_dir: str) -> None:
    need("nbdcopy")
    src = tmp_path / "src.raw"
    data = os.urandom(16 * MiB)
    src.write_bytes(data)
    with serving(tmp_path, sock_dir, size=16 * MiB) as (_srv, img, sock):
        run("nbdcopy", "--flush", str(src), uri(sock))     # multi-conn: several connections at once
        with open(img, "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


def test_fio_randwrite_with_crc32c_verify_at_iodepth_16(tmp_path: Any, sock_dir: str) -> None:
    need("fio")
    engines = run("fio", "--enghelp").stdout
    if "nbd" not in engines.split():
        pytest.skip("this fio has no nbd ioengine")
    with serving(tmp_path, sock_dir, size=16 * MiB) as (_srv, _img, sock):
        res = run("fio", "--name=nbdverify", "--ioengine=nbd", f"--uri={uri(sock)}",
                  "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
                  "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--runtime=60",
                  "--output-format=json")
        out = json.loads(res.stdout[res.stdout.index("{"):])
        [job] = out["jobs"]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 16 * MiB
        assert job["read"]["io_bytes"] == 16 * MiB         # the verify pass read it all back


def test_trim_punches_a_hole_and_no_hole_zeroing_does_not(tmp_path: Any, sock_dir: str) -> None:
    need("qemu-io")
    content = os.urandom(12 * MiB)
    with serving(tmp_path, sock_dir, content=content) as (srv, img, sock):
        if not srv.device.can_trim:
            pytest.skip(f"the filesystem under {tmp_path} cannot punch holes")
        region = 4 * MiB // 512                     # st_blocks counts 512-byte units
        full = os.stat(img).st_blocks
        run("qemu-io", "-f", "raw", "-c", "discard 0 4M", uri(sock))                # NBD_CMD_TRIM
        after_trim = os.stat(img).st_blocks
        assert after_trim <= full - region
        run("qemu-io", "-f", "raw", "-c", "write -z -u 4M 4M", uri(sock))         # WRITE_ZEROES, may trim
        after_unmap = os.stat(img).st_blocks
        assert after_unmap <= after_trim - region
        run("qemu-io", "-f", "raw", "-c", "write -z 0 4M", uri(sock))             # WRITE_ZEROES + NO_HOLE
        assert os.stat(img).st_blocks >= after_unmap + region   # real zeroes: allocated again
        with open(img, "rb") as f:
            got = f.read()
        assert got[:8 * MiB] == bytes(8 * MiB) and got[8 * MiB:] == content[8 * MiB:]


def test_read_only_export_refuses_writes_from_real_clients(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo", "qemu-img", "nbdcopy")
    content = os.urandom(4 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(4 * MiB))
    with serving(tmp_path, sock_dir, content=content, read_only=True) as (_srv, img, sock):
        e = nbdinfo_json(sock)
        assert e["is_read_only"] is True and not e["can_trim"] and not e["can_zero"]
        assert run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(sock), ok=False).returncode
        assert run("nbdcopy", str(src), uri(sock), ok=False).returncode
        out = tmp_path / "out.raw"
        run("qemu-img", "convert", "-O", "raw", uri(sock), str(out))              # reading still works
        assert out.read_bytes() == content
        with open(img, "rb") as f:
            assert f.read() == content


def test_pipelined_requests_are_matched_by_handle(tmp_path: Any, sock_dir: str) -> None:
    content = os.urandom(8 * MiB)
    with serving(tmp_path, sock_dir, content=content) as (_srv, img, sock):
        c = RawClient(sock)
        assert c.handshake()[0] == 8 * MiB
        expected = {}
        for h in range(64):
            off = (h * 7919 % 128) * 65536
            if h % 3 == 0:
                data = os.urandom(65536)
                c.send(Cmd.WRITE, 1000 + h, 4 * MiB + h * 65536 % (4 * MiB), 65536, CmdFlag.FUA * (h % 2), data)
                expected[1000 + h] = b""
            else:
                c.send(Cmd.READ, h, off % (4 * MiB), 65536)
                expected[h] = content[off % (4 * MiB):off % (4 * MiB) + 65536]
        c.send(Cmd.FLUSH, 5000)
        expected[5000] = b""
        got = {}
        while c.pending:
            h, err, data = c.reply()
            assert err == 0
            got[h] = data
        assert got == expected
        c.send(Cmd.DISC, 0)
        assert c.sock.recv(1) == b""                  # server closes after DISC
        c.close()


def test_several_clients_at_once(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo")
    with serving(tmp_path, sock_dir, size=8 * MiB) as (_srv, img, sock):
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                c = RawClient(sock)
                c.handshake()
                base = i * MiB
                blobs = {h: os.urandom(4096) for h in range(32)}
                for h, b in blobs.items():
                    c.send(Cmd.WRITE, h, base + h * 4096, 4096, 0, b)
                while c.pending:
                    assert c.reply()[1] == 0
                for h in blobs:
                    c.send(Cmd.READ, h, base + h * 4096, 4096)
                while c.pending:
                    h, err, data = c.reply()
                    assert err == 0 and data == blobs[h]
                c.send(Cmd.DISC, 0)
                c.close()
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        nbdinfo_json(sock)                              # a real client in the middle of it
        for t in threads:
            t.join()
        assert not errors, errors


def test_client_vanishing_mid_request_does_not_hurt_the_server(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo")
    with serving(tmp_path, sock_dir, size=8 * MiB) as (srv, _img, sock):
        # Half a write payload, then gone.
        c = RawClient(sock)
        c.handshake()
        c.sock.sendall(req(Cmd.WRITE, 1, 0, MiB) + bytes(MiB // 2))
        c.close()
        # Many large reads in flight, replies never read, then gone.
        c = RawClient(sock)
        c.handshake()
        for h in range(32):
            c.send(Cmd.READ, h, (h % 8) * MiB, MiB)
        c.close()
        # Gone in the middle of the handshake.
        c = RawClient(sock)
        c.recv_exact(18)
        c.sock.sendall(struct.pack(">I", 1) + opt(Opt.GO)[:10])
        c.close()
        assert nbdinfo_json(sock)["export-size"] == 8 * MiB
    # serving() checked that every connection thread ended.


def test_protocol_violation_gets_a_hard_disconnect(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir) as (_srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        c.send(Cmd.READ, 1, 0, 4096)
        c.sock.sendall(struct.pack(">I", 0x12345678) + bytes(24))
        # The server may or may not get the read's reply out first; it must
        # then close the connection.
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                c.reply()
        c.close()


def test_oversized_write_is_refused_and_the_connection_survives(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir) as (_srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        length = MAX_BLOCK_SIZE + 4096
        c.pending[7] = (Cmd.WRITE, length)
        c.sock.sendall(req(Cmd.WRITE, 7, 0, length))
        chunk = bytes(MiB)
        for _ in range(length // MiB):
            c.sock.sendall(chunk)
        c.sock.sendall(bytes(length % MiB))
        assert c.reply() == (7, NbdErr.EINVAL, b"")
        c.send(Cmd.READ, 8, 0, 4096)
        assert c.reply() == (8, 0, bytes(4096))
        c.close()


def test_close_finishes_connected_clients(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir) as (srv, _img, sock):
        idle = RawClient(sock)
        idle.handshake()
        busy = RawClient(sock)
        busy.handshake()
        busy.send(Cmd.READ, 1, 0, 4096)
        assert busy.reply()[1] == 0
        srv.close()
        assert idle.sock.recv(1) == b""
        assert busy.sock.recv(1) == b""
        idle.close()
        busy.close()


def test_client_that_stops_reading_is_disconnected_after_the_send_timeout(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir, send_timeout=0.5) as (srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        for h in range(40):                               # 40 MiB of replies nobody reads
            c.send(Cmd.READ, h, (h % 8) * MiB, MiB)
        for _ in range(600):
            if srv.active_connections == 0:
                break
            threading.Event().wait(0.05)                 # waiting for the server to give up on it
        assert srv.active_connections == 0
        c.close()


def test_socket_mode_stale_sockets_and_refusals(tmp_path: Any, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "nbd.sock")
    # A socket file left behind by a dead server is replaced.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with serving(tmp_path, sock_dir) as (srv, _img, sock):
        assert sock == path
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # ... but a live one is not, nor is a path that is not a socket.
        other = NbdServer(sock, srv.device)
        with pytest.raises(FileExistsError):
            other.start()
        other.close()
    plain = os.path.join(sock_dir, "plain")
    open(plain, "w").close()
    with pytest.raises(FileExistsError):
        NbdServer(plain, _DummyDevice()).start()
    with serving(tmp_path, sock_dir, mode=0o660) as (_srv, _img, sock):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660


class _DummyDevice:
    size = 4096
    sector_size = 512
    read_only = True
    can_trim = can_write_zeroes = can_multi_conn = False
    can_flush = True
