"""Xen's public ABI as Python constants and struct layouts.

Every number here is checked against Debian's libxen-dev headers by
tests/test_abi_headers.py, which compiles a C program against them; these
files are a transcription, the headers are the reference.
"""
