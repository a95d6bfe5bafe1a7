"""Watches: who wants to hear about which paths, and which watches an event matches.

Rules (docs/misc/xenstore.txt, Xen 4.17 ``xenstored_watch.c``):

* A watch is (connection, canonical path, token); the same pair twice on a
  connection is EEXIST.  Paths starting with ``@`` are special and only match
  the events xenstored invents (``@introduceDomain``, ``@releaseDomain``).
* An ordinary event on path P matches every watch on P or on an ancestor of P
  (everything matches a watch on ``/``).  An *exact* event (a child removed
  by a recursive RM, or a special event) matches only watches on P itself.
* Events go out connection by connection in the order connections were made,
  and within one connection in the order its watches were set.
* A watch set with a relative path reports relative event paths.
* Whether a watcher may see an event (permissions) is decided by the core;
  this registry only answers "which watches match".
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from .paths import ancestors_and_self, watch_display_path

ConnId = Hashable


@dataclass(slots=True)
class Watch:
    conn: ConnId
    path: str                    # canonical: absolute, or an @special name
    token: bytes
    relative_base: str | None    # the connection's home if the watch was set relative
    seq: int                     # registration order, across all connections

    def event_path(self, event: str) -> str:
        return watch_display_path(event, self.relative_base)

    def memory(self) -> int:
        """What C charges the watcher's domain: path and token lengths."""
        return len(self.path) + len(self.token)


class WatchRegistry:
    """All watches, indexed by connection and by watched path."""

    def __init__(self) -> None:
        self._by_conn: dict[ConnId, dict[tuple[str, bytes], Watch]] = {}
        self._by_path: dict[str, dict[tuple[ConnId, bytes], Watch]] = {}
        self._next_seq = 0

    def add(self, conn: ConnId, path: str, token: bytes, relative_base: str | None) -> Watch:
        self._next_seq += 1
        watch = Watch(conn, path, token, relative_base, self._next_seq)
        self._by_conn.setdefault(conn, {})[(path, token)] = watch
        self._by_path.setdefault(path, {})[(conn, token)] = watch
        return watch

    def find(self, conn: ConnId, path: str, token: bytes) -> Watch | None:
        return self._by_conn.get(conn, {}).get((path, token))

    def remove(self, conn: ConnId, path: str, token: bytes) -> Watch | None:
        watch = self._by_conn.get(conn, {}).pop((path, token), None)
        if watch is not None:
            self._unindex(watch)
        return watch

    def remove_all(self, conn: ConnId) -> list[Watch]:
        watches = list(self._by_conn.pop(conn, {}).values())
        for watch in watches:
            self._unindex(watch)
        return watches

    def _unindex(self, watch: Watch) -> None:
        at_path = self._by_path.get(watch.path)
        if at_path is not None:
            at_path.pop((watch.conn, watch.token), None)
            if not at_path:
                del self._by_path[watch.path]

    def of(self, conn: ConnId) -> list[Watch]:
        return list(self._by_conn.get(conn, {}).values())

    def all(self) -> Iterable[Watch]:
        for watches in self._by_conn.values():
            yield from watches.values()

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_conn.values())

    def matching(self, path: str, exact: bool, conn_order: Mapping[ConnId, int]) -> list[Watch]:
        """Watches an event on ``path`` reaches, in delivery order."""
        by_path = self._by_path
        if not by_path:
            return []
        candidates: list[Watch] = []
        for watched in ((path,) if exact else ancestors_and_self(path)):
            at_path = by_path.get(watched)
            if at_path:
                candidates.extend(at_path.values())
        if len(candidates) > 1:
            candidates.sort(key=lambda w: (conn_order.get(w.conn, 0), w.seq))
        return candidates
