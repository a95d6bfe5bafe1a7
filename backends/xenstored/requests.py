"""xenstored's requests, one handler each (C's ``wire_funcs[]``), and their argument parsing.

A handler gets the request (who asks, through which view of the tree) and
the message, and returns the reply's payload or raises ``XenstoreError``
with the errno to answer; ``XenstoreCore._process`` (core.py) checks what
every request needs first (type, privilege, transaction id) and sends the
reply.  Handlers check permissions and quotas before they change anything
(core_state.py holds the rules they share), so a refused request leaves the
store as it was.  Numbers are plain decimal (C's atoi takes anything).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from xdom.domains.abi.xs_wire import XENSTORE_PAYLOAD_MAX, Message, XenstoreError, XsType

from .core_state import CoreState, Request
from .domains import DOMID_FIRST_RESERVED, DOMID_SELF, PRIVILEGED_DOMID, Domain, Introduced
from .paths import (
    INTRODUCE_DOMAIN,
    ROOT,
    SPECIAL_WATCH_PATH_MAX,
    canonicalize,
    decode,
    domain_path,
    encode,
    is_special,
    is_valid_node_path,
    parent_of,
)
from .permissions import Access, access_for, format_perms, parse_perms
from .quota import Quota
from .transactions import Transaction

log = logging.getLogger(__name__)

_OK: Final = b"OK\0"
_DECIMAL = re.compile(rb"[0-9]{1,10}")
_SIGNED_DECIMAL = re.compile(rb"-?[0-9]{1,20}")


# ---- argument parsing (C's get_string / get_strings / onearg) --------------------------------

def _onearg(payload: bytes) -> str | None:
    """The single argument: the payload must hold exactly one NUL, at its end."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return decode(payload[:-1])


def _strings(payload: bytes) -> list[bytes]:
    """NUL-terminated strings; bytes after the last NUL are ignored, as C's get_strings does."""
    return payload.split(b"\0")[:-1]


def _parse_u32(raw: bytes | str | None) -> int | None:
    """A decimal number 0..2^32-1.  Stricter than C's atoi, which reads 'abc' as 0."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = encode(raw)
    if not _DECIMAL.fullmatch(raw):
        return None
    value = int(raw)
    return value if value <= 0xFFFFFFFF else None


class RequestHandlers(CoreState):
    """The request handlers, on the core's state (``XenstoreCore`` is the class to use)."""

    def _op_read(self, req: Request, msg: Message) -> bytes:
        return self._get_node(req, self._onearg_path(req, msg.payload), Access.READ).value

    def _op_directory(self, req: Request, msg: Message) -> bytes:
        return self._get_node(req, self._onearg_path(req, msg.payload), Access.READ).children_bytes()

    def _op_directory_part(self, req: Request, msg: Message) -> bytes:
        """``<gencnt>\\0`` then children from byte ``offset`` on, as many as fit; a final
        empty string marks the end of the list (C's ``send_directory_part``)."""
        if msg.payload.count(b"\0") != 2:
            raise XenstoreError("EINVAL")
        raw_path, raw_offset, _ = msg.payload.split(b"\0")
        node = self._get_node(req, self._path_arg(req, decode(raw_path)), Access.READ)
        offset = _parse_u32(raw_offset)
        if offset is None:
            raise XenstoreError("EINVAL")
        gen = str(node.generation).encode() + b"\0"
        children = node.children_bytes()
        if offset >= len(children):
            return gen + b"\0"
        max_len = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        length = 0
        while True:
            name_len = children.find(b"\0", offset + length) - (offset + length)
            if length + name_len >= max_len:
                break
            length += name_len + 1
            if offset + length == len(children):
                break
        chunk = gen + children[offset:offset + length]
        return chunk + b"\0" if offset + length == len(children) else chunk

    def _op_get_perms(self, req: Request, msg: Message) -> bytes:
        node = self._get_node(req, self._onearg_path(req, msg.payload), Access.READ)
        return format_perms(node.perms)

    def _op_write(self, req: Request, msg: Message) -> bytes:
        cut = msg.payload.find(b"\0")
        if cut < 0:
            raise XenstoreError("EINVAL")
        raw_path = msg.payload[:cut]
        path = self._canonical_path(req, raw_path, raw_path)
        value = msg.payload[cut + 1:]
        try:
            node = self._get_node(req, path, Access.WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            node = self._create_node(req, path, value)
        else:
            self._check_node_write(req, node.path, node.perms, len(value), node.children_len)
            node.value = value
            req.view.write(node)
        self._fire(req, node.path, node, False, None)
        return _OK

    def _op_mkdir(self, req: Request, msg: Message) -> bytes:
        path = self._onearg_path(req, msg.payload)
        try:
            self._get_node(req, path, Access.WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            node = self._create_node(req, path, b"")
            self._fire(req, node.path, node, False, None)
        return _OK

    def _op_rm(self, req: Request, msg: Message) -> bytes:
        path = self._onearg_path(req, msg.payload)
        try:
            self._get_node(req, path, Access.WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            # Not there: fine, as long as its parent is.
            if req.view.read(parent_of(path)) is not None:
                return _OK
            raise
        if path == ROOT:
            raise XenstoreError("EINVAL")
        self._rm_node(req, path)
        return _OK

    def _op_set_perms(self, req: Request, msg: Message) -> bytes:
        count = msg.payload.count(b"\0")
        if count < 2:
            raise XenstoreError("EINVAL")
        count -= 1
        if req.unprivileged and count > self.quota.permissions:
            raise XenstoreError("ENOSPC")
        fields_ = msg.payload.split(b"\0")
        perms = self._domains.alloc_permrefs(parse_perms([decode(f) for f in fields_[1:count + 1]]))
        if perms[0].ignored:
            raise XenstoreError("ENOENT", "owner does not exist")
        raw_path = decode(fields_[0])
        if is_special(raw_path):
            current = self._special_perms.get(raw_path)
            if current is None:
                raise XenstoreError("EINVAL")
            need = Access.WRITE | Access.OWNER
            if access_for(req.who, current) & need != need:
                raise XenstoreError("EACCES")
            self._special_perms[raw_path] = perms
            self._changed_special = True
            return _OK
        node = self._get_node(req, self._path_arg(req, raw_path), Access.WRITE | Access.OWNER)
        if req.unprivileged and perms[0].domid != node.owner:
            raise XenstoreError("EPERM", "only a privileged domain may change the owner")
        self._check_node_write(req, node.path, perms, len(node.value), node.children_len)
        old_perms = node.perms
        if req.tx is not None:
            req.tx.entry_delta[node.owner] -= 1
            req.tx.entry_delta[perms[0].domid] += 1
        node.perms = perms
        req.view.write(node)
        self._fire(req, node.path, node, False, old_perms)
        return _OK

    def _op_watch(self, req: Request, msg: Message) -> bytes:
        args = _strings(msg.payload)
        if len(args) != 2:
            raise XenstoreError("EINVAL")
        path, token = decode(args[0]), args[1]
        relative_base = None
        if is_special(path):
            if len(path) > SPECIAL_WATCH_PATH_MAX:
                raise XenstoreError("EINVAL")
        else:
            if not path.startswith(ROOT):
                relative_base = req.conn.home
            path = canonicalize(path, req.conn.home)
            if not is_valid_node_path(path, self.quota.path_max):
                raise XenstoreError("EINVAL")
        c = req.conn
        if self._watches.find(c.conn, path, token) is not None:
            raise XenstoreError("EEXIST")
        if req.unprivileged:
            if self._watch_count[c.domid] > self.quota.watches:
                raise XenstoreError("E2BIG")
            if self._domain_memory(c.domid) + len(path) + len(token) >= self.quota.memory:
                raise XenstoreError("ENOMEM")
        watch = self._add_watch(c, path, token, relative_base)
        self._after_reply.append(lambda: self._queue_event(c, watch.event_path(watch.path), token))
        return _OK

    def _op_unwatch(self, req: Request, msg: Message) -> bytes:
        args = _strings(msg.payload)
        if len(args) != 2:
            raise XenstoreError("EINVAL")
        path = canonicalize(decode(args[0]), req.conn.home)
        watch = self._watches.remove(req.conn.conn, path, args[1])
        if watch is None:
            raise XenstoreError("ENOENT")
        self._forget_watch(req.conn, watch)
        return _OK

    def _op_transaction_start(self, req: Request, msg: Message) -> bytes:
        c = req.conn
        if req.tx is not None:
            raise XenstoreError("EBUSY", "no nested transactions")
        if req.unprivileged and len(c.transactions) > self.quota.transactions:
            raise XenstoreError("ENOSPC")
        tx_id = c.next_tx_id
        while tx_id == 0 or tx_id in c.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        c.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        if tx_id >= self._tx_saved.get(c.domid, 1):
            self._tx_unsaved = True
        c.transactions[tx_id] = Transaction(tx_id, self._store.next_generation())
        return str(tx_id).encode() + b"\0"

    def _op_transaction_end(self, req: Request, msg: Message) -> bytes:
        arg = _onearg(msg.payload)
        if arg not in ("T", "F"):
            raise XenstoreError("EINVAL")
        tx = req.tx
        if tx is None:
            raise XenstoreError("ENOENT")
        del req.conn.transactions[tx.id]
        if arg == "F":
            return _OK
        if tx.failed:
            raise XenstoreError("ENOMEM", "a request in the transaction failed half-way")
        check_quota = tx.node_created and req.unprivileged
        for domid, delta in tx.entry_delta.items():
            # C's transaction_fix_domains: every domain whose node count the commit
            # changes must still exist, or it would own nodes a later namesake inherits.
            if self._domains.find_or_alloc_existing(domid) is None:
                raise XenstoreError("ENOMEM", f"domain {domid} owning nodes of the transaction is gone")
            if check_quota and domid != PRIVILEGED_DOMID and \
                    max(0, self._store.entries[domid] + delta) >= self.quota.nodes:
                raise XenstoreError("ENOSPC", "node quota")
        if tx.conflicts_with(self._store):
            raise XenstoreError("EAGAIN")
        for path, accessed in tx.modified_nodes():
            if accessed.node is not None:
                self._adjust_perms(accessed.node)      # against when it was written, before its new generation
                accessed.node.generation = self._store.next_generation()
                self._store.put(accessed.node)
            elif accessed.generation is not None:
                self._store.remove(path)
            if accessed.fire_watch:
                self._fire_now(path, None, accessed.watch_exact, accessed.original_perms)
        return _OK

    def _op_introduce(self, req: Request, msg: Message) -> bytes:
        args = _strings(msg.payload)
        if len(args) < 3:
            raise XenstoreError("EINVAL")
        domid, port = _parse_u32(args[0]), _parse_u32(args[2])
        gfn = int(args[1]) if _SIGNED_DECIMAL.fullmatch(args[1]) else None
        # C takes atoi's word for it; xdom refuses what cannot be a guest's ring.
        if domid is None or port is None or gfn is None or port == 0 or \
                not PRIVILEGED_DOMID < domid < DOMID_FIRST_RESERVED:
            raise XenstoreError("EINVAL")
        domain = self._domains.find_or_alloc(domid)       # introducing a domain makes it exist (C too)
        again = domain.introduced
        domain.introduced, domain.gfn, domain.port = True, gfn, port
        self._domains.changed.add(domid)
        if again:
            # C's domain_conn_reset: the domain starts over on its ring.
            for c in self._conns.values():
                if c.domid == domid:
                    self._drop_watches(c)
                    c.transactions.clear()
        self._effects.append(Introduced(domid, gfn, port))
        if not again:
            self._fire_now(INTRODUCE_DOMAIN, None, True, None)
        return _OK

    def _onearg_domain(self, msg: Message) -> Domain:
        """C's ``onearg_domain``: an introduced domain other than 0, else EINVAL/ENOENT."""
        domid = _parse_u32(_onearg(msg.payload))
        if not domid:
            raise XenstoreError("EINVAL")
        domain = self._domains.introduced(domid)
        if domain is None:
            raise XenstoreError("ENOENT")
        return domain

    def _op_release(self, req: Request, msg: Message) -> bytes:
        """The reply goes first, then the removal's watch events and @releaseDomain: what C
        does in the usual case, where its main loop holds the dying connection until the
        request is answered."""
        domid = self._onearg_domain(msg).domid
        self._after_reply.append(lambda: self._destroy_domain(domid, dead=False))
        return _OK

    def _op_resume(self, req: Request, msg: Message) -> bytes:
        self._onearg_domain(msg)    # no shutdown tracking here: nothing to re-arm
        return _OK

    def _op_set_target(self, req: Request, msg: Message) -> bytes:
        args = _strings(msg.payload)
        if len(args) < 2:
            raise XenstoreError("EINVAL")
        domid, target = _parse_u32(args[0]), _parse_u32(args[1])
        if domid is None or target is None:
            raise XenstoreError("EINVAL")
        domain = self._domains.introduced(domid)
        if domain is None or self._domains.introduced(target) is None:
            raise XenstoreError("ENOENT")
        domain.target = target
        self._domains.changed.add(domid)
        return _OK

    def _op_get_domain_path(self, req: Request, msg: Message) -> bytes:
        domid = _parse_u32(_onearg(msg.payload))
        if domid is None:
            raise XenstoreError("EINVAL")
        return encode(domain_path(domid)) + b"\0"

    def _op_is_domain_introduced(self, req: Request, msg: Message) -> bytes:
        domid = _parse_u32(_onearg(msg.payload))
        if domid is None:
            raise XenstoreError("EINVAL")
        return b"T\0" if domid == DOMID_SELF or self._domains.introduced(domid) else b"F\0"

    def _op_reset_watches(self, req: Request, msg: Message) -> bytes:
        self._drop_watches(req.conn)
        req.conn.transactions.clear()
        return _OK

    def _op_control(self, req: Request, msg: Message) -> bytes:
        """A small subset of C's CONTROL commands: check, help, log, print, quota, quota-soft."""
        cut = msg.payload.find(b"\0")
        if cut < 0:
            raise XenstoreError("EINVAL")
        command = decode(msg.payload[:cut])
        args = [decode(a) for a in _strings(msg.payload)[1:]]
        if command == "check":
            if args:
                raise XenstoreError("EINVAL")
            for problem in self.check():
                log.error("xenstored check: %s", problem)
            return _OK
        if command in ("log", "print"):
            if len(args) != 1 or (command == "log" and args[0] not in ("on", "off")):
                raise XenstoreError("EINVAL")
            if command == "print":
                log.info("control: %s", args[0])
            return _OK
        if command == "help":
            if args:
                raise XenstoreError("EINVAL")
            return (b"check\t\nlog\ton|off\nprint\t<string>\nquota\t[set <name> <val>|<domid>]\n"
                    b"quota-soft\t[set <name> <val>]\nhelp\t\n") + b"\0"
        if command in ("quota", "quota-soft"):
            return self._control_quota(args, soft=command == "quota-soft")
        raise XenstoreError("EINVAL")

    def _control_quota(self, args: list[str], soft: bool) -> bytes:
        table = ((("memory", "memory_soft", "Total Xenstore memory per domain (warning level)"),) if soft
                 else Quota.control_table())
        if not args:
            lines = "".join(f"{name:<17}: {getattr(self.quota, attr):8d} {descr}\n" for name, attr, descr in table)
            return f"Quota settings:\n{lines}".encode() + b"\0"
        if args[0] == "set":
            value = _parse_u32(args[2]) if len(args) == 3 else None
            attr = next((a for name, a, _ in table if len(args) == 3 and name == args[1]), None)
            if attr is None or not value:
                raise XenstoreError("EINVAL")
            self.quota = replace(self.quota, **{attr: value})
            return _OK
        domid = _parse_u32(args[0]) if len(args) == 1 and not soft else None
        if domid is None:
            raise XenstoreError("EINVAL")
        if domid not in self._domains:
            raise XenstoreError("ENOENT")       # (C) only domains xenstored knows
        transactions = sum(len(c.transactions) for c in self._conns.values() if c.domid == domid)
        rows = (("nodes", self._store.entries[domid]), ("watches", self._watch_count[domid]),
                ("transactions", transactions), ("outstanding", 0), ("memory", self._domain_memory(domid)))
        text = f"Domain {domid}:\n" + "".join(f"{name:<16}: {value:8d}\n" for name, value in rows)
        return text.encode() + b"\0"


@dataclass(frozen=True, slots=True)
class Op:
    """How a request type is handled: its handler, and what ``_process`` checks before calling it."""

    handler: Callable[[RequestHandlers, Request, Message], bytes]
    privileged_only: bool = False
    ignores_transaction: bool = False


# C's wire_funcs[]: handler and flags per request type; anything else is ENOSYS.
OPS: Final[dict[int, Op]] = {
    XsType.XS_CONTROL: Op(RequestHandlers._op_control, privileged_only=True),
    XsType.XS_DIRECTORY: Op(RequestHandlers._op_directory),
    XsType.XS_READ: Op(RequestHandlers._op_read),
    XsType.XS_GET_PERMS: Op(RequestHandlers._op_get_perms),
    XsType.XS_WATCH: Op(RequestHandlers._op_watch, ignores_transaction=True),
    XsType.XS_UNWATCH: Op(RequestHandlers._op_unwatch, ignores_transaction=True),
    XsType.XS_TRANSACTION_START: Op(RequestHandlers._op_transaction_start),
    XsType.XS_TRANSACTION_END: Op(RequestHandlers._op_transaction_end),
    XsType.XS_INTRODUCE: Op(RequestHandlers._op_introduce, privileged_only=True),
    XsType.XS_RELEASE: Op(RequestHandlers._op_release, privileged_only=True),
    XsType.XS_GET_DOMAIN_PATH: Op(RequestHandlers._op_get_domain_path),
    XsType.XS_WRITE: Op(RequestHandlers._op_write),
    XsType.XS_MKDIR: Op(RequestHandlers._op_mkdir),
    XsType.XS_RM: Op(RequestHandlers._op_rm),
    XsType.XS_SET_PERMS: Op(RequestHandlers._op_set_perms),
    XsType.XS_IS_DOMAIN_INTRODUCED: Op(RequestHandlers._op_is_domain_introduced, privileged_only=True),
    XsType.XS_RESUME: Op(RequestHandlers._op_resume, privileged_only=True),
    XsType.XS_SET_TARGET: Op(RequestHandlers._op_set_target, privileged_only=True),
    XsType.XS_RESET_WATCHES: Op(RequestHandlers._op_reset_watches),
    XsType.XS_DIRECTORY_PART: Op(RequestHandlers._op_directory_part),
}
