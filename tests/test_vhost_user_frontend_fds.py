"""What a descriptor from the VMM must be before the guest domain's vhost-user shell uses it.

``frontend_fds`` is checked here on real descriptors, one kind at a time;
``test_vhost_user_hostile_vm.py`` sends the same over a real socket.
"""

from __future__ import annotations

import fcntl
import os
import socket

import pytest

from xdom.domains.hostsys.files import HUGETLBFS_MAGIC, filesystem_magic
from xdom.domains.vhost_user.frontend_fds import kick_fd_problem, memory_fd_problem, sealed_memfd

HUGE = 2 * 1024 * 1024


def _memfd(size: int, flags: int = 0, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("xvu-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_sealed_memfd_long_enough_is_memory() -> None:
    fd = _memfd(HUGE)
    try:
        assert memory_fd_problem(fd, HUGE) is None
        assert "bytes long" in (memory_fd_problem(fd, HUGE + 4096) or "")
    finally:
        os.close(fd)


def test_unsealed_memfd_is_not_memory() -> None:
    fd = _memfd(HUGE, seals=fcntl.F_SEAL_GROW)
    try:
        assert "F_SEAL_SHRINK" in (memory_fd_problem(fd, HUGE) or "")
    finally:
        os.close(fd)


def test_hugetlb_memfd_is_not_memory_even_sealed() -> None:
    """The seal does not stop a hole punched in hugetlbfs, and a hole the pool cannot fill is a SIGBUS."""
    try:
        fd = _memfd(HUGE, flags=os.MFD_HUGETLB)
    except OSError as e:
        pytest.skip(f"no sealable hugetlb memfd here: {e}")
    try:
        assert filesystem_magic(fd) == HUGETLBFS_MAGIC
        assert "hugetlbfs" in (memory_fd_problem(fd, HUGE) or "")
    finally:
        os.close(fd)


def test_our_own_inflight_memfd_is_memory() -> None:
    fd = sealed_memfd("xvu-inflight", 4096)
    try:
        assert filesystem_magic(fd) != HUGETLBFS_MAGIC
        assert memory_fd_problem(fd, 4096) is None
    finally:
        os.close(fd)


def test_counter_eventfd_is_a_kick_fd_and_its_pending_kicks_are_consumed() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        os.eventfd_write(fd, 5)
        assert kick_fd_problem(fd) is None
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)                     # nothing left to wake the loop for nothing
    finally:
        os.close(fd)


def test_counter_eventfd_near_its_limit_is_a_kick_fd() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
        assert kick_fd_problem(fd) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("count", [0, 1, 0xFFFF_FFFF_FFFF_FFFE])
def test_semaphore_eventfd_is_refused(count: int) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
    try:
        if count:
            os.eventfd_write(fd, count)
        assert "semaphore" in (kick_fd_problem(fd) or "")
    finally:
        os.close(fd)


def test_blocking_eventfd_is_refused_without_blocking() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        assert "blocking" in (kick_fd_problem(fd) or "")
    finally:
        os.close(fd)


def test_pipe_socket_file_and_memfd_are_not_kick_fds() -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    m = _memfd(4096)
    try:
        for fd in (r, w, a.fileno(), m):
            os.set_blocking(fd, False)
            assert kick_fd_problem(fd) == "not an eventfd", fd
    finally:
        for fd in (r, w, m):
            os.close(fd)
        a.close()
        b.close()
