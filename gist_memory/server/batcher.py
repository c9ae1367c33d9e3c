"""Micro-batching for the server: requests from many threads decoded together by one background thread.

    batcher = Batcher(model)                                   # max_batch=16, window_s=0.005
    text = batcher.generate("question", states=states, max_new_tokens=32)        # from any thread
    for piece in batcher.stream("question", states=states): ...                  # pieces as they are decoded
    batcher.close()

A request is prepared in its caller's thread (`prepare`: prefix cache and re-rotated states; a bad request fails
there, as with `GistModel.stream`) and queued. The batcher thread waits for a first request, gathers what arrives
within `window_s` (up to `max_batch`), prefills them together and decodes them one token per step in one forward
(`gist_memory.model.batching.Decoder`). Requests that arrive while a batch runs join it at the next step (no
window: the running rows do not wait); a finished row leaves at once. Streaming works per row: each piece goes to
its caller's queue as it is decoded, and closing the stream cancels the row at the next step.

Requests that batching does not take (generation arguments outside `BATCH_GEN_KWARGS`, an adapted reader) are
served by `GistModel.stream` in the caller's thread, as without a batcher.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from gist_memory.model.batching import BatchRequest, Decoder, Row, batchable
from gist_memory.model.usage import Usage, check_usage

logger = logging.getLogger("gist_memory.server")

_END = object()


class Batcher:
    """Decodes concurrent requests to one `GistModel` together (see the module docstring).

    Args:
        model: A `GistModel`.
        max_batch: Most rows decoded at once; more requests wait for rows to finish.
        window_s: How long the idle batcher waits after a first request for others to join its prefill.
        prefill: `padded` (one forward for all new rows) or `rows` (one per row); see `Decoder`.
    """

    def __init__(self, model: Any, max_batch: int = 16, window_s: float = 0.005, prefill: str = "padded") -> None:
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.model = model
        self.max_batch = int(max_batch)
        self.window_s = float(window_s)
        self.decoder = Decoder(model, prefill=prefill) if batchable(model, {}) else None
        self._waiting: deque[Row] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.batches = 0  # prefills run (each a group of new rows), for monitoring and tests
        self.max_rows = 0  # most rows seen decoding together

    # ---- public ------------------------------------------------------------------------------------
    def accepts(self, gen: dict[str, Any]) -> bool:
        """Whether a request with generation arguments `gen` is batched (else `GistModel.stream` serves it)."""
        return self.decoder is not None and batchable(self.model, gen)

    def stream(self, prompt: Any, states: Optional[Sequence[Any]] = None, *, usage: Optional[Usage] = None,
               **gen: Any) -> Iterator[str]:
        """Like `GistModel.stream`: text pieces as they are decoded, `usage` filled when the stream ends
        (exhausted or closed). Closing it early cancels the request."""
        if not self.accepts(gen):
            return self.model.stream(prompt, states=states, usage=usage, **gen)
        check_usage(usage)
        return self._stream(prompt, states, usage, gen)

    def generate(self, prompt: Any, states: Optional[Sequence[Any]] = None, *, usage: Optional[Usage] = None,
                 **gen: Any) -> str:
        """Like `GistModel.generate`, decoded in a batch with whatever else is running."""
        return "".join(self.stream(prompt, states=states, usage=usage, **gen))

    def close(self) -> None:
        """Stop the thread; requests still waiting or decoding end with a RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60)

    @property
    def pending(self) -> int:
        """Requests waiting to join a batch."""
        with self._cond:
            return len(self._waiting)

    # ---- callers' side -----------------------------------------------------------------------------
    def _stream(self, prompt: Any, states: Optional[Sequence[Any]], usage: Optional[Usage],
                gen: dict[str, Any]) -> Iterator[str]:
        out: queue.SimpleQueue = queue.SimpleQueue()
        cancel = threading.Event()
        req = BatchRequest(prompt, states, dict(gen), usage=usage, on_text=out.put, cancelled=cancel.is_set)
        row = Row(self.model, req, on_done=lambda _: out.put(_END))  # prepared here: bad requests fail here
        self._submit(row)
        ended = False
        try:
            while True:
                item = out.get()
                if item is _END:
                    ended = True
                    break
                yield item
            if row.error is not None:
                raise row.error
        finally:
            if not ended:  # closed early: the row leaves at the next step, and fills `usage` then
                cancel.set()
                while out.get() is not _END:
                    pass

    def _submit(self, row: Row) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._waiting.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gist-memory-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    # ---- the batcher thread ------------------------------------------------------------------------
    def _take(self) -> Optional[list[Row]]:
        """New rows to add: waits (window) only when nothing is decoding; None once closed."""
        dec = self.decoder
        with self._cond:
            if not len(dec):
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                deadline = time.monotonic() + self.window_s
                while len(self._waiting) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            elif self._closed:
                return None
            n = min(self.max_batch - len(dec), len(self._waiting))
            return [self._waiting.popleft() for _ in range(n)]

    def _run(self) -> None:
        dec = self.decoder
        try:
            while True:
                new = self._take()
                if new is None:
                    break
                if new:
                    try:
                        dec.add(new)
                        self.batches += 1
                    except Exception as e:  # noqa: BLE001 - these requests fail; the batcher keeps serving
                        logger.exception("batched prefill failed")
                        for r in new:
                            r.finish(error=e)
                self.max_rows = max(self.max_rows, len(dec))
                if len(dec):
                    try:
                        dec.step()
                    except Exception as e:  # noqa: BLE001
                        logger.exception("batched decoding step failed")
                        dec.fail(e)
        finally:
            err = RuntimeError("the batcher is closed")
            dec.fail(err)
            with self._cond:
                self._closed = True
                rest = list(self._waiting)
                self._waiting.clear()
            for r in rest:
                r.finish(error=err)
