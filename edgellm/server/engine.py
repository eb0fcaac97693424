"""The workers that run generations: up to ``max_batch`` at once in cache slots, their target passes batched (:class:`Engine`)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator

from edgellm.api import LLM
from edgellm.generation import StreamEvent
from edgellm.server.parse import ApiError, GenRequest


class Job:
    """One queued generation: events flow from the worker thread into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, item: StreamEvent | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[StreamEvent]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


#: prompt tokens a joining request prefills per turn while others generate (~1.6 s here)
PREFILL_CHUNK = 64


@dataclass
class _Active:
    """A generation in a cache slot: its job and request."""

    job: Job
    req: GenRequest
    slot: int


@dataclass
class Engine:
    """Runs up to ``llm``'s ``max_batch`` generations at once, one thread each, in cache slots.

    Requests are admitted first come first served into free cache slots (the one whose cache
    shares most with the prompt, so a chat's next turn finds its conversation) as soon as one is
    free: a request arriving during a long generation starts right away instead of after it ends.
    The generations' target passes meet at ``llm.gate``: with a batch graph in the bundle, one
    onnxruntime call verifies every generation's proposals (continuous batching; each sequence's
    output is its solo output); without one they take turns. A long prompt is prefilled
    ``prefill_chunk`` tokens a pass, so it does not stall the others. Further requests wait
    (``max_queue`` of them, then 429).
    """

    llm: LLM
    max_queue: int = 8
    prefill_chunk: int = PREFILL_CHUNK
    waiting: int = 0  # accepted and not finished (running + queued); touched on the event loop only
    served: int = 0
    last_stats: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._pending: deque[tuple[Job, GenRequest]] = deque()
        self._active: list[_Active] = []
        self._wake = threading.Condition()
        threading.Thread(target=self._loop, name="edgellm-generate", daemon=True).start()

    @property
    def max_batch(self) -> int:
        return len(self.llm.slots)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def check_room(self) -> None:
        """Raise 429 (with ``Retry-After``) when the queue is full."""
        if self.waiting >= self.max_batch + self.max_queue:
            last = (self.last_stats or {}).get("total_s") or 1.0
            retry = max(1, math.ceil(last * self.waiting / self.max_batch))  # the queue ahead at the last pace
            raise ApiError(429, f"the server is busy: {self.waiting} requests are running or queued "
                                f"(max_batch={self.max_batch}, max_queue={self.max_queue}); retry in {retry} s",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})

    def start(self, req: GenRequest) -> Job:
        self.check_room()
        job = Job(asyncio.get_running_loop())
        self.waiting += 1
        with self._wake:
            self._pending.append((job, req))
            self._wake.notify()
        return job

    def _finished(self) -> None:
        self.waiting -= 1

    def _end(self, job: Job) -> None:
        job.put(None)
        try:
            job.loop.call_soon_threadsafe(self._finished)
        except RuntimeError:  # the event loop is gone
            pass

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending or len(self._active) >= self.max_batch:
                    self._wake.wait()
                self._admit()

    def _admit(self) -> None:
        """Move waiting requests into free slots, first come first served; each runs on its own thread."""
        while self._pending and len(self._active) < self.max_batch:
            job, req = self._pending.popleft()
            if job.cancelled.is_set():  # the client left while queued
                self._end(job)
                continue
            free = sorted(set(range(self.max_batch)) - {a.slot for a in self._active})
            slot = (self.llm.pick_slot(req.prompt_ids, free, req.options.adapter) if len(free) > 1
                    else free[0])
            act = _Active(job, req, slot)
            self._active.append(act)
            threading.Thread(target=self._run, args=(act,), name=f"edgellm-slot{slot}", daemon=True).start()

    def _run(self, act: _Active) -> None:
        """Run ``act`` to its end; its target passes join the other slots' (``llm.gate``)."""
        gate = self.llm.gate
        try:
            with gate.member() if gate is not None else contextlib.nullcontext():
                self._generate(act)
        finally:
            with self._wake:
                self._active.remove(act)
                self._wake.notify()
            self._end(act.job)

    def _generate(self, act: _Active) -> None:
        events = None
        try:
            chunk = self.prefill_chunk if self.max_batch > 1 else None
            events = self.llm.stream_events(act.req.prompt, act.req.options, slot=act.slot,
                                            prompt_ids=act.req.prompt_ids, prefill_chunk=chunk)
            for ev in events:
                if act.job.cancelled.is_set():
                    break
                if ev.result is not None:
                    with self._wake:  # generations end on several threads
                        self.last_stats, self.served = ev.result.stats, self.served + 1
                act.job.put(ev)
        except BaseException as e:  # noqa: BLE001 - handed to the request's task, which answers it
            act.job.put(e)
        finally:
            if events is not None:
                events.close()  # a cancelled generation's end still runs (shared lookup, caches)
