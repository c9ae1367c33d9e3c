"""Persistent chat history (SQLite) that keeps the gist state of every compressed turn.

    db = GistHistoryStore("chat.sqlite")                          # one file, many sessions
    history = GistChatMessageHistory("user-42", db)               # a LangChain BaseChatMessageHistory
    chat = ChatGist(model=model, state_store=db)                  # reads/writes turn states in the same file

Layout of the file:

    meta(key, value)                     format and version
    messages(row, session_id, msg_id, type, message, state_key, state_fp, state, created_at)
        one row per message, in order; `message` is LangChain's json (`message_to_dict`); the first message of a
        compressed turn keeps the turn's gist state: `state` (safetensors bytes of `GistState.to_bytes()`, never
        pickle), `state_key` (`model.state_key(turn text)`) and `state_fp` (the model fingerprint)
    states(state_key, state_fp, state, created_at)
        states of texts that belong to no stored message (e.g. the head of an over-long message)

WAL journal, a busy timeout and `BEGIN IMMEDIATE` transactions: several processes can append to one history
and nothing is lost. A restarted app finds every compressed turn's state by its key and compresses nothing again.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional, Union

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from langchain_gist_memory._states import StateEntry

if TYPE_CHECKING:  # the history itself needs no torch: gist_memory loads when states are read
    from gist_memory import GistState

logger = logging.getLogger(__name__)

HISTORY_FORMAT = "gist-memory/chat-history"
HISTORY_VERSION = 1
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    state_key TEXT,
    state_fp TEXT,
    state BLOB,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_session ON messages(session_id, row);
CREATE INDEX IF NOT EXISTS messages_msg_id ON messages(msg_id);
CREATE INDEX IF NOT EXISTS messages_state_key ON messages(state_key);
CREATE TABLE IF NOT EXISTS states (
    state_key TEXT PRIMARY KEY,
    state_fp TEXT NOT NULL,
    state BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


class HistoryError(ValueError):
    """The history database is corrupted, not a gist-memory history, or holds a row that cannot be read."""


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    msg = str(e).lower()
    return any(s in msg for s in ("not a database", "malformed", "corrupt", "file is encrypted"))


class GistHistoryStore:
    """One SQLite file holding the messages of many chat sessions and the gist states of their turns.

    It is also a `StateStore`: pass it to `ChatGist(state_store=...)` so compressed turns persist.

    Args:
        path: The database file (created if missing).
        timeout: Seconds to wait for another writer before failing.

    Raises:
        HistoryError: The file is not a SQLite database, is corrupted, or is another kind of database.
    """

    def __init__(self, path: Union[str, os.PathLike], timeout: float = 60.0) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if os.path.isdir(self.path):
            raise HistoryError(f"chat history path {self.path} is a folder; give a file path")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._lock = threading.RLock()
        self._closed = False
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=timeout)
        try:
            with self._guard("open"):
                self._db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                with self._write():
                    tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                    if tables and "meta" not in tables:
                        raise HistoryError(
                            f"{self.path} is a SQLite database of something else (tables {sorted(tables)[:5]}), "
                            f"not a gist-memory chat history"
                        )
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
                    if not meta:
                        self._db.execute(
                            "INSERT INTO meta(key, value) VALUES ('format', ?), ('version', ?)",
                            (HISTORY_FORMAT, str(HISTORY_VERSION)),
                        )
                    elif meta.get("format") != HISTORY_FORMAT:
                        raise HistoryError(f"{self.path} is not a gist-memory chat history (format {meta.get('format')!r})")
                    elif meta.get("version") != str(HISTORY_VERSION):
                        raise HistoryError(f"{self.path}: unsupported chat history version {meta.get('version')!r}")
        except BaseException:
            self._db.close()
            raise

    # ---- plumbing ------------------------------------------------------------------------------------
    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn sqlite errors into a HistoryError that names the file and says what to do."""
        try:
            yield
        except HistoryError:
            raise
        except sqlite3.DatabaseError as e:
            if _is_corruption(e):
                raise HistoryError(
                    f"chat history database {self.path} is corrupted or not a SQLite file ({e}); move it aside "
                    f"(or restore a backup) to start a new history"
                ) from e
            raise HistoryError(f"chat history {self.path}: {what} failed: {e}") from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _check_open(self) -> None:
        if self._closed:
            raise HistoryError(f"chat history {self.path} is closed")

    def close(self) -> None:
        """Close the database. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> GistHistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GistHistoryStore({self.path!r})"

    # ---- messages ------------------------------------------------------------------------------------
    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> list[str]:
        """Append messages to a session in one transaction; returns their ids (assigned when missing).

        Raises:
            TypeError: An item is not a LangChain message.
            ValueError: A message type that cannot be stored and read back.
        """
        self._check_open()
        rows = []
        now = time.time()
        for i, m in enumerate(messages):
            if not isinstance(m, BaseMessage):
                raise TypeError(f"messages[{i}] is a {type(m).__name__}, not a langchain BaseMessage")
            if not m.id:
                m = m.model_copy(update={"id": f"gm-{uuid.uuid4().hex}"})
            d = message_to_dict(m)
            try:
                messages_from_dict([d])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"messages[{i}] has type {m.type!r} ({type(m).__name__}), which cannot be stored in a chat "
                    f"history: {e}"
                ) from e
            rows.append((str(session_id), str(m.id), d["type"], json.dumps(d, ensure_ascii=False), now))
        if not rows:
            return []
        with self._lock, self._guard("append"):
            self._check_open()
            with self._write():
                self._db.executemany(
                    "INSERT INTO messages(session_id, msg_id, type, message, created_at) VALUES (?,?,?,?,?)", rows
                )
        return [r[1] for r in rows]

    def load(self, session_id: str) -> list[BaseMessage]:
        """The messages of a session, oldest first (each with its id).

        Raises:
            HistoryError: A row cannot be read back (its row number is named).
        """
        self._check_open()
        with self._lock, self._guard("read"):
            rows = self._db.execute(
                "SELECT row, type, message FROM messages WHERE session_id = ? ORDER BY row", (str(session_id),)
            ).fetchall()
        out = []
        for row, typ, data in rows:
            try:
                out += messages_from_dict([json.loads(data)])
            except (ValueError, KeyError, TypeError) as e:
                raise HistoryError(
                    f"chat history {self.path}: row {row} of session {session_id!r} (type {typ!r}) cannot be read: {e}"
                ) from e
        return out

    def clear(self, session_id: str) -> int:
        """Delete a session's messages (and the states they kept); returns how many were deleted."""
        self._check_open()
        with self._lock, self._guard("clear"):
            with self._write():
                return self._db.execute("DELETE FROM messages WHERE session_id = ?", (str(session_id),)).rowcount

    def sessions(self) -> list[str]:
        """Session ids with at least one message."""
        self._check_open()
        with self._lock, self._guard("read"):
            return [r[0] for r in self._db.execute("SELECT DISTINCT session_id FROM messages ORDER BY session_id")]

    def count(self, session_id: Optional[str] = None) -> int:
        """Messages stored (in one session, or in all)."""
        self._check_open()
        with self._lock, self._guard("read"):
            if session_id is None:
                return int(self._db.execute("SELECT count(*) FROM messages").fetchone()[0])
            q = "SELECT count(*) FROM messages WHERE session_id = ?"
            return int(self._db.execute(q, (str(session_id),)).fetchone()[0])

    def count_states(self) -> int:
        """Gist states stored (on message rows and loose)."""
        self._check_open()
        with self._lock, self._guard("read"):
            a = self._db.execute("SELECT count(*) FROM messages WHERE state IS NOT NULL").fetchone()[0]
            b = self._db.execute("SELECT count(*) FROM states").fetchone()[0]
        return int(a) + int(b)

    # ---- StateStore ----------------------------------------------------------------------------------
    def get_states(self, keys: Sequence[str], fingerprint: str) -> dict[str, GistState]:
        """Stored states among `keys` written by the model `fingerprint` (unreadable ones are left out)."""
        self._check_open()
        found: dict[str, bytes] = {}
        with self._lock, self._guard("read states"):
            for i in range(0, len(keys), _CHUNK):
                chunk = list(keys[i : i + _CHUNK])
                marks = ",".join("?" * len(chunk))
                for table in ("messages", "states"):
                    q = (f"SELECT state_key, state FROM {table} WHERE state_key IN ({marks}) "
                         f"AND state_fp = ? AND state IS NOT NULL")
                    for k, blob in self._db.execute(q, [*chunk, fingerprint]):
                        found.setdefault(k, blob)
        from gist_memory import GistState, StateFormatError

        out: dict[str, GistState] = {}
        for k, blob in found.items():
            try:
                st = GistState.from_bytes(bytes(blob))
            except (StateFormatError, ValueError) as e:
                logger.warning("chat history %s: state %s is unreadable (%s); it will be recompressed", self.path,
                               k[:12], e)
                continue
            if st.model_fingerprint == fingerprint:
                out[k] = st
        return out

    def put_states(self, entries: Sequence[StateEntry]) -> None:
        """Store states: on the row of the first message of their turn, else in the `states` table."""
        self._check_open()
        if not entries:
            return
        now = time.time()
        blobs = [(e, e.state.to_bytes()) for e in entries]
        with self._lock, self._guard("write states"):
            with self._write():
                for e, blob in blobs:
                    fp = e.state.model_fingerprint
                    n = 0
                    if e.message_ids:
                        n = self._db.execute(
                            "UPDATE messages SET state_key = ?, state_fp = ?, state = ? WHERE msg_id = ?",
                            (e.key, fp, blob, str(e.message_ids[0])),
                        ).rowcount
                    if not n:
                        self._db.execute(
                            "INSERT OR REPLACE INTO states(state_key, state_fp, state, created_at) VALUES (?,?,?,?)",
                            (e.key, fp, blob, now),
                        )


class GistChatMessageHistory(BaseChatMessageHistory):
    """The messages of one session in a `GistHistoryStore` (a LangChain `BaseChatMessageHistory`).

    Works with `RunnableWithMessageHistory`:

        db = GistHistoryStore("chat.sqlite")
        chain = RunnableWithMessageHistory(prompt | ChatGist(model=m, state_store=db),
                                           lambda sid: GistChatMessageHistory(sid, db), ...)

    Args:
        session_id: The conversation.
        store: A `GistHistoryStore`, or a path to open one at.
    """

    def __init__(self, session_id: str, store: Union[GistHistoryStore, str, os.PathLike]) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("session_id must be a non-empty str")
        self.session_id = session_id
        self.store = store if isinstance(store, GistHistoryStore) else GistHistoryStore(store)

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The session's messages, oldest first."""
        return self.store.load(self.session_id)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append messages (one transaction)."""
        self.store.append(self.session_id, list(messages))

    def clear(self) -> None:
        """Delete the session's messages."""
        self.store.clear(self.session_id)

    def __repr__(self) -> str:
        return f"GistChatMessageHistory({self.session_id!r}, {self.store!r})"
