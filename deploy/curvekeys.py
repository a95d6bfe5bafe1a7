"""CurveZMQ keys for remote hosts: making them, reading them, and the allow-list a host checks clients against.

A host that listens on tcp (``[host] listen``) has one server key pair; every
client (an admin's ``xdom``) has its own pair.  A host serves only clients
whose public key is in its allow-list, a directory of public key files
(``STATE_DIR/keys/allowed_clients/*.key`` by default), and a client talks
only to a host whose public key its fleet file names, so both ends are
authenticated and everything between them is encrypted (CurveZMQ, RFC 26).

Key files are ZeroMQ's own certificate format (``zmq.auth.load_certificate``
reads them; so do czmq's ``zcert`` tools): ``NAME.key`` holds the public key,
``NAME.key_secret`` both.  A secret key file is written 0600 and is believed
only when nobody but its owner (root or this uid) can read or write it, as
ssh treats a private key: a key others could read is a key others have.

:func:`zap_reply` is the allow-list decision as a pure function over ZAP
(RFC 27) frames; :mod:`xdom.deploy.remote` runs it in its loop.
"""

from __future__ import annotations

import os
import re
import stat

import zmq
import zmq.auth
import zmq.utils.z85

__all__ = ["KeyFileError", "allow", "load_allowed", "load_public", "load_secret", "make_pair", "public_of", "zap_reply"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
Z85_KEY_LEN = 40

_BANNER = ("#   xdom CurveZMQ {what} (ZeroMQ certificate format; zmq.auth.load_certificate reads it)\n"
           "#   {note}\n\n")


class KeyFileError(Exception):
    """A key that cannot be made or must not be used; the message says which file and why."""


def _write(path: str, public: bytes, secret: bytes | None) -> None:
    body = _BANNER.format(what="secret key" if secret else "public key",
                          note="keep it to yourself: whoever reads it can act as its owner" if secret
                          else "give it to the other side (xdom keys allow, or the fleet file)")
    body += f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret:
        body += f'    secret-key = "{secret.decode()}"\n'
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(body)


def make_pair(directory: str, name: str) -> tuple[str, str]:
    """A new key pair: ``directory/name.key`` (public) and ``name.key_secret`` (0600); existing files are kept.

    Returns (public file, secret file).
    """
    if not _NAME.fullmatch(name):
        raise KeyFileError(f"a key name is letters, digits, '.', '_' or '-' (at most 64), not {name!r:.70}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public_path = os.path.join(directory, f"{name}.key")
    secret_path = public_path + "_secret"
    for p in (public_path, secret_path):
        if os.path.lexists(p):
            raise KeyFileError(f"{p} exists: not overwriting a key (remove it first to make a new one)")
    public, secret = zmq.curve_keypair()
    _write(secret_path, public, secret)
    _write(public_path, public, None)
    return public_path, secret_path


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key file that only its owner (root or us) can read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(f"no secret key at {path} (make one with xdom keys)") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"refusing {path}: not a regular file")
    if not _trusted_owner(st):
        raise KeyFileError(f"refusing {path}: owned by uid {st.st_uid}, not by root or uid {os.geteuid()}")
    if st.st_mode & 0o077:
        raise KeyFileError(f"refusing {path}: its mode {stat.S_IMODE(st.st_mode):04o} lets others read or write it "
                        f"(chmod 600 {path})")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{path} is not a key file: {e}") from None
    if not secret:
        raise KeyFileError(f"{path} holds a public key only; a secret key file ends in .key_secret")
    return public, secret


def load_public(path: str) -> bytes:
    """The public key in a key file (public or secret)."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{path} is not a key file: {e}") from None
    return public


def public_of(value: str) -> bytes:
    """A public key given as 40 Z85 characters (a fleet file's ``server_key``), checked."""
    raw = value.strip().encode()
    if len(raw) != Z85_KEY_LEN:
        raise KeyFileError(f"a public key is {Z85_KEY_LEN} Z85 characters, not {len(raw)}")
    try:
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError):
        raise KeyFileError(f"{value!r:.50} is not a Z85 key") from None
    return raw


def load_allowed(directory: str) -> set[bytes]:
    """The allow-list: the public key of every ``*.key`` file in a directory only root (or we) can change."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise KeyFileError(f"no allow-list at {directory} (xdom keys allow CLIENT.key --dir ...)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"refusing the allow-list {directory}: not a directory")
    if not _trusted_owner(st) or st.st_mode & 0o022:
        raise KeyFileError(f"refusing the allow-list {directory}: others can change it (owner uid {st.st_uid}, "
                        f"mode {stat.S_IMODE(st.st_mode):04o})")
    keys: set[bytes] = set()
    for entry in sorted(os.listdir(directory)):
        if not entry.endswith(".key"):
            continue
        path = os.path.join(directory, entry)
        est = os.lstat(path)
        if not stat.S_ISREG(est.st_mode) or not _trusted_owner(est) or est.st_mode & 0o022:
            raise KeyFileError(f"refusing the allow-list entry {path}: not a regular file only root (or we) can change")
        keys.add(load_public(path))
    return keys


def allow(directory: str, public_file: str) -> str:
    """Add a client's public key file to an allow-list directory (made 0700 if absent); returns the new entry."""
    public = load_public(public_file)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    name = os.path.basename(public_file)
    if name.endswith(".key_secret"):
        name = name[:-len("_secret")]
    if not name.endswith(".key"):
        name += ".key"
    dest = os.path.join(directory, name)
    if os.path.lexists(dest):
        if load_public(dest) == public:
            return dest
        raise KeyFileError(f"{dest} exists with another key: rename the client's key file")
    _write(dest, public, None)
    return dest


# ---- ZAP (RFC 27): the allow-list decision, sans-IO -------------------------------------------------

ZAP_VERSION = b"1.0"


def zap_reply(frames: list[bytes], allowed: set[bytes]) -> tuple[list[bytes], bytes | None]:
    """The reply to one ZAP request, and the client's Z85 public key when it is let in (else None).

    Only CURVE is ever accepted, and only from a key in ``allowed``: a NULL or
    PLAIN peer, or anything malformed, gets a 400.  The user id of an accepted
    client is its public key, so the front door can log who asked what.
    """
    # [routing id..., b"", version, request id, domain, address, identity, mechanism, credentials...]
    try:
        split = frames.index(b"")
    except ValueError:
        return [], None
    envelope, body = frames[:split + 1], frames[split + 1:]
    if len(body) < 6:
        return [], None
    version, request_id, _domain, _address, _identity, mechanism, *credentials = body

    def reply(code: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
        return [*envelope, ZAP_VERSION, request_id, code, text, user, b""]
    if version != ZAP_VERSION:
        return reply(b"400", b"unsupported ZAP version"), None
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return reply(b"400", b"only CURVE clients are served"), None
    key = zmq.utils.z85.encode(credentials[0])
    if key not in allowed:
        return reply(b"400", b"client key not on the allow-list"), None
    return reply(b"200", b"OK", key), key
