"""Host system calls the standard library lacks or gets wrong for us, written once for every process.

Rules:

* Thin wrappers only: one system call (or libc function) each, with its
  errors raised as ``OSError`` (EINTR retried), no policy and no state
  beyond the mappings and descriptors a caller asked for.
* Shared by the broker, the domains and the backends: this package and
  ``xdom.domains.abi`` are the only parts of ``domains/`` the broker imports
  (tests/test_layers.py), so nothing here may import anything of xdom but
  the ABI.

Modules: ``sysmem`` (mmap/munmap/madvise through libc: a mapping costs no
descriptor), ``memory`` (a domain's memory as memfd frames), ``grant_lock``
(the OFD locks on grant entries), ``wakeup`` (an eventfd to wake a poll
loop), ``files`` (fallocate with its mode flags).
"""
