"""One background thread that owns the `LLM`: it adds and aborts requests and steps the engine.

HTTP handlers never touch the engine. They `submit` token ids and get a `Ticket`: the engine
thread keeps the latest `RequestOutput` of each of the ticket's requests in it and wakes the
handler's event loop; outputs are cumulative, so a slow reader holds one output per request,
never a backlog. A handler that goes away calls `abort`, which frees the request's blocks at
the next step boundary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("tierlm.serve")


class Busy(Exception):
    """The request queue is full (-> 429)."""


class Stopping(Exception):
    """The server is shutting down (-> 503)."""


@dataclass
class Slot:
    """What the handler sees of one engine request."""
    added: bool = False
    error: tuple[int, str] | None = None      # (HTTP status, message): refused, or failed while running
    output: Any = None                        # the latest RequestOutput
    done: bool = False
    first_token_at: float | None = None


@dataclass
class Ticket:
    """An HTTP request's engine requests (one per prompt); filled in by the engine thread."""
    rids: list[str]
    loop: asyncio.AbstractEventLoop
    slots: dict[str, Slot] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    created: float = field(default_factory=time.perf_counter)
    checked: float = field(default_factory=time.monotonic)   # last look for a client disconnect

    def __post_init__(self):
        self.slots = {r: Slot() for r in self.rids}

    def _update(self, rid: str, fn: Callable[[Slot], None]) -> None:
        with self.lock:
            fn(self.slots[rid])
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:                  # the handler's loop is gone
            pass

    async def changed(self) -> dict[str, Slot]:
        """Wait for news, then a snapshot of every slot."""
        await self.event.wait()
        self.event.clear()
        return self.snapshot()

    def snapshot(self) -> dict[str, Slot]:
        with self.lock:
            return {r: Slot(s.added, s.error, s.output, s.done, s.first_token_at) for r, s in self.slots.items()}


class EngineLoop:
    """Owns `llm`; at most `capacity` requests are queued or running at once."""

    def __init__(self, llm, capacity: int, on_finish: Callable[[Any, Ticket], None] | None = None):
        self.llm = llm
        self.capacity = capacity
        self.on_finish = on_finish
        self._cv = threading.Condition()
        self._cmds: deque = deque()
        self._tickets: dict[str, Ticket] = {}      # engine thread only: rid -> ticket of requests in the engine
        self._pending = 0                          # requests submitted and not yet finished (under _cv)
        self._stopping = False
        self._deadline: float | None = None        # drain until then, then fail what is left
        self._thread: threading.Thread | None = None
        self.stats: dict = {}
        self.step_errors = 0

    # ------------------------------------------------------------------ handler side
    def start(self) -> None:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tierlm-engine", daemon=True)
                self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, prompts: list[list[int]], params, rids: list[str]) -> Ticket:
        """Queue one engine request per prompt. Raises Busy or Stopping (nothing queued then)."""
        ticket = Ticket(list(rids), asyncio.get_running_loop())
        with self._cv:
            if self._stopping:
                raise Stopping("the server is shutting down")
            if self._pending + len(prompts) > self.capacity:
                raise Busy(f"server busy: {self._pending} requests queued or running (limit {self.capacity}); "
                           "retry later")
            self._pending += len(prompts)
            for ids, rid in zip(prompts, rids):
                self._cmds.append(("add", rid, ids, params, ticket))
            self._cv.notify()
        self.start()
        return ticket

    def abort(self, ticket: Ticket) -> None:
        """Drop the ticket's unfinished requests (a client went away)."""
        with self._cv:
            for rid in ticket.rids:
                self._cmds.append(("abort", rid, None, None, ticket))
            self._cv.notify()

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run fn(llm) on the engine thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._cmds.append(("call", None, fn, fut, None))
            self._cv.notify()
        self.start()
        return fut

    def drain(self, grace_s: float) -> None:
        """Refuse new requests; finish the running ones for up to grace_s, then fail the rest."""
        with self._cv:
            if not self._stopping:
                self._stopping = True
                self._deadline = time.monotonic() + grace_s
            self._cv.notify()

    def stop(self, grace_s: float = 0.0, timeout: float | None = None) -> None:
        """drain(grace_s) and wait for the engine thread to end."""
        self.drain(grace_s)
        with self._cv:
            self._deadline = min(self._deadline, time.monotonic() + grace_s)
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:               # a bug here must not leave requests hanging
            log.exception("the engine thread failed; the server refuses new requests")
            with self._cv:
                self._stopping = True
            self._fail_all(500, "the engine thread failed; see the server log")
            raise

    def _loop(self) -> None:
        llm = self.llm
        self.stats = self._safe_stats()
        while True:
            with self._cv:
                while not self._cmds and not llm.scheduler.has_work() and not self._stopping:
                    self._cv.wait()
                cmds = list(self._cmds)
                self._cmds.clear()
            for cmd in cmds:
                self._command(*cmd)
            if self._stopping:
                if not self._tickets:
                    break
                if time.monotonic() >= self._deadline:
                    self._fail_all(503, "the server is shutting down; the request was not finished")
                    break
            if llm.scheduler.has_work():
                self._step()
            elif self._stopping:
                time.sleep(0.01)
        with self._cv:                      # anything submitted meanwhile is refused
            for kind, rid, _, fut, ticket in self._cmds:
                if kind == "add":
                    self._refuse(rid, ticket, 503, "the server is shutting down")
                elif kind == "call":
                    fut.set_exception(Stopping("the server is shutting down"))
            self._cmds.clear()
        self.stats = self._safe_stats()

    def _command(self, kind, rid, arg, extra, ticket) -> None:
        llm = self.llm
        if kind == "call":
            try:
                extra.set_result(arg(llm))
            except Exception as e:          # noqa: BLE001 - handed to the caller
                extra.set_exception(e)
            return
        if kind == "abort":
            if rid in self._tickets:
                llm.abort(rid)
                self._finish(rid)
            return
        from ..errors import TierlmError
        try:
            llm.add_request(arg, extra, request_id=rid)
        except TierlmError as e:
            self._refuse(rid, ticket, 400, str(e))
            return
        except Exception as e:              # noqa: BLE001 - one bad request must not stop the server
            log.exception("add_request failed")
            self._refuse(rid, ticket, 500, f"engine error: {type(e).__name__}: {e}")
            return
        self._tickets[rid] = ticket
        ticket._update(rid, lambda s: setattr(s, "added", True))

    def _refuse(self, rid: str, ticket: Ticket, status: int, msg: str) -> None:
        with self._cv:
            self._pending -= 1
        ticket._update(rid, lambda s: (setattr(s, "error", (status, msg)), setattr(s, "done", True)))

    def _finish(self, rid: str) -> Ticket | None:
        ticket = self._tickets.pop(rid, None)
        if ticket is not None:
            with self._cv:
                self._pending -= 1
        return ticket

    def _step(self) -> None:
        try:
            outs = self.llm.step()
        except Exception as e:              # noqa: BLE001 - fail the requests in the engine, keep serving
            self.step_errors += 1
            log.exception("engine step failed")
            self._fail_all(500, f"engine error: {type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        for out in outs:
            ticket = self._tickets.get(out.request_id)
            if ticket is None:
                continue

            def put(s: Slot, out=out):
                s.output = out
                if s.first_token_at is None and any(c.token_ids for c in out.outputs):
                    s.first_token_at = now
                s.done = out.finished
            ticket._update(out.request_id, put)
            if out.finished:
                self.llm.abort(out.request_id)      # the engine keeps finished requests until asked
                self._finish(out.request_id)
                if self.on_finish is not None:
                    try:
                        self.on_finish(out, ticket)
                    except Exception:               # noqa: BLE001 - metrics must not break serving
                        log.exception("on_finish failed")

    def _fail_all(self, status: int, msg: str) -> None:
        for rid in list(self._tickets):
            try:
                self.llm.abort(rid)
            except Exception:               # noqa: BLE001
                log.exception("abort failed")
            ticket = self._finish(rid)
            ticket._update(rid, lambda s: (setattr(s, "error", (status, msg)), setattr(s, "done", True)))

    def _safe_stats(self) -> dict:
        try:
            return self.llm.stats()
        except Exception:                   # noqa: BLE001
            log.exception("stats failed")
            return dict(self.stats)
