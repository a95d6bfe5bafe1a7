"""Adversarial tests (security issue 11): attacks run from real domain processes under uids of their own.

A package, so that its modules import as ``security.<name>`` and never clash
with a module of the same name in tests/; tests/conftest.py's fixtures
apply here as everywhere under tests/.
"""
