"""Several sequences' target passes in one onnxruntime call (continuous batching).

Two pieces:

* :class:`BatchedGraph` runs the passes of up to ``slots`` sessions (cache slots of one loaded
  target) as one call of the bundle's batch graph (written by ``edgellm.export.batch_graph``):
  their rows go through the linear layers together, each through its own attention and cache.
  Every session pads its rows as it would alone (``DecoderSession.min_rows``, ``row_multiple``),
  so each row is computed exactly as in its solo pass: the output of every sequence is the
  output it gets alone.
* :class:`PassGate` gathers those passes from generations running on several threads: a
  thread's pass waits until every generation taking part is waiting too (or has left), then one
  of them runs all the waiting passes at once. A generation's Python work (drafting, accepting,
  detokenizing) runs between passes, in parallel with nothing heavier than other generations'
  Python work and draft passes.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

#: the batch graph's input naming the rows whose logits a pass returns (int64 ``(n,)``)
LOGIT_ROWS = "logit_rows"


def slot_name(slot: int, name: str) -> str:
    """A per-slot input or output of the batch graph: ``slot{j}.`` + the target graph's name."""
    return f"slot{slot}.{name}"


@dataclass
class Part:
    """One session's pass waiting at the gate: its rows (int64 ``(S,)``) and how many trailing
    rows' logits it wants; ``logits`` (float ``(n, V)``) or ``error`` once the pass has run, and
    ``seconds``, its share of the call that ran it (the call's time times its share of the rows)."""

    session: Any
    token_ids: np.ndarray
    num_logits: int
    logits: np.ndarray | None = None
    seconds: float = 0.0
    error: BaseException | None = None
    done: bool = False


class BatchedGraph:
    """The batch graph of one target, opened once; runs any number of its sessions' passes.

    The sessions are ``DecoderSession`` forks of that target (their ``length``, ``adapter``,
    cache buffers and bound LoRA values are read here; their ``length`` is not changed).
    """

    def __init__(self, path: Path, layout, provider, threads: int | None, slots: int) -> None:
        import onnxruntime as ort

        from edgellm.runtimes.graphs import open_session

        self.layout, self.slots = layout, slots
        self.session, self.load_seconds = open_session(path, provider, threads)
        check_batch_graph(self.session, layout, slots, path)
        shape = (1, layout.num_kv_heads, layout.max_context, layout.head_dim)
        # an idle slot's one row writes its keys here (position 0; never read back)
        self._scratch = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.dtype(layout.dtype)))

    def run(self, parts: list[Part]) -> None:
        """Run ``parts`` (each a different session), filling in their ``logits``: one call per
        ``slots`` of them that compute with the same LoRA adapter."""
        groups: dict[Any, list[Part]] = {}
        for p in parts:
            groups.setdefault(p.session.adapter, []).append(p)
        for group in groups.values():
            for k in range(0, len(group), self.slots):
                self._run(group[k: k + self.slots])

    def _run(self, parts: list[Part]) -> None:
        io, lay = self.layout.io, self.layout
        b = self.session.io_binding()
        t0 = time.perf_counter()
        b.bind_output(io["logits"], "cpu")  # bound first: get_outputs()[0]
        ids = np.concatenate([p.token_ids for p in parts]).astype(np.int64)
        b.bind_cpu_input(io["input_ids"], ids.reshape(1, -1))
        offsets = np.cumsum([0] + [len(p.token_ids) for p in parts])
        for j in range(self.slots):
            if j < len(parts):
                s, n = parts[j].session, len(parts[j].token_ids)
                rows, total, caches = np.arange(offsets[j], offsets[j + 1]), s.length + n, s._cache
            else:  # idle: one row (row 0) into the scratch cache, its output cut off
                rows, total, caches = np.zeros(1, np.int64), 1, [self._scratch] * (2 * lay.num_layers)
            b.bind_cpu_input(slot_name(j, "rows"), rows.astype(np.int64))
            b.bind_cpu_input(slot_name(j, io["seqlens_k"]), np.array([total - 1], np.int32))
            b.bind_cpu_input(slot_name(j, io["total_sequence_length"]), np.array(total, np.int32))
            for i in range(lay.num_layers):
                for k, (past, present) in enumerate((("past_key", "present_key"), ("past_value", "present_value"))):
                    b.bind_ortvalue_input(slot_name(j, io[past] % i), caches[2 * i + k])
                    b.bind_ortvalue_output(slot_name(j, io[present] % i), caches[2 * i + k])
        b.bind_cpu_input(LOGIT_ROWS, np.concatenate(
            [np.arange(offsets[j + 1] - p.num_logits, offsets[j + 1]) for j, p in enumerate(parts)]).astype(np.int64))
        for name, value in parts[0].session.lora_values().items():
            b.bind_ortvalue_input(name, value)
        self.session.run_with_iobinding(b)
        logits = b.get_outputs()[0].numpy()[0]
        ends, seconds = np.cumsum([p.num_logits for p in parts]), time.perf_counter() - t0
        for p, end in zip(parts, ends):
            p.logits = logits[end - p.num_logits: end]
            p.seconds = seconds * len(p.token_ids) / len(ids)


def check_batch_graph(session, layout, slots: int, path: Path) -> None:
    """Refuse a batch graph whose inputs and outputs are not those of ``slots`` slots of ``layout``.

    Raises:
        BundleError: naming the graph and the first missing name.
    """
    from edgellm.errors import BundleError

    io, lay = layout.io, layout
    inputs = {i.name for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    want_in = [LOGIT_ROWS, io["input_ids"]] + [f"lora.{t}.{k}" for t in (lay.lora or {}).get("sites", {}) for k in "ab"]
    want_out = [io["logits"]]
    for j in range(slots):
        want_in += [slot_name(j, n) for n in ("rows", io["seqlens_k"], io["total_sequence_length"])]
        want_in += [slot_name(j, io[k] % i) for i in range(lay.num_layers) for k in ("past_key", "past_value")]
        want_out += [slot_name(j, io[k] % i) for i in range(lay.num_layers) for k in ("present_key", "present_value")]
    missing = [n for n in want_in if n not in inputs] + [n for n in want_out if n not in outputs]
    if missing or slot_name(slots, "rows") in inputs:
        what = f"no {missing[0]!r}" if missing else f"more than batch_slots={slots} slots"
        raise BundleError(f"{path}: the batch graph does not match the manifest ({what}); the manifest was "
                          "edited, or the bundle mixes files of two exports")


def run_each(parts: list[Part]) -> None:
    """The gate's runner for graphs without a batch graph: each pass alone, in turn."""
    for p in parts:
        t0 = time.perf_counter()
        p.logits = p.session._run_alone(p.token_ids, p.num_logits)
        p.seconds = time.perf_counter() - t0


class PassGate:
    """Gathers target passes from generations on several threads into one call of ``runner``.

    A generation takes part inside :meth:`member` (the server's worker threads do); a pass
    submitted by a thread that is not a member (``llm.generate`` from user code) takes part for
    that pass alone. The passes run when every member is waiting at the gate, all at once.
    """

    def __init__(self, runner: Callable[[list[Part]], None]) -> None:
        self.runner = runner
        self._cv = threading.Condition()
        self._members = 0
        self._waiting: list[Part] = []
        self._running = False
        self._local = threading.local()
        self.passes = 0  # calls of runner so far, and the parts they held (for stats and tests)
        self.parts_run = 0

    @contextmanager
    def member(self) -> Iterator[None]:
        """This thread's passes wait for the other members' (a generation in flight)."""
        with self._cv:
            self._members += 1
        self._local.member = True
        try:
            yield
        finally:
            self._local.member = False
            with self._cv:
                self._members -= 1
                self._cv.notify_all()  # the others may all be waiting on this one

    def submit(self, session, token_ids: np.ndarray, num_logits: int) -> Part:
        """Run ``session``'s pass with the others' (see :meth:`DecoderSession._run`); the part, its logits in."""
        part = Part(session, token_ids, num_logits)
        guest = not getattr(self._local, "member", False)
        with self._cv:
            self._members += guest
            self._waiting.append(part)
            self._cv.notify_all()
            try:
                while not part.done:
                    if not self._running and self._waiting and len(self._waiting) >= self._members:
                        self._lead()
                    else:
                        self._cv.wait()
            finally:
                self._members -= guest
                self._cv.notify_all()
        if part.error is not None:
            raise part.error
        return part

    def _lead(self) -> None:
        """Run every waiting pass (called holding the lock; released while the passes run)."""
        batch, self._waiting, self._running = self._waiting, [], True
        self._cv.release()
        try:
            self.runner(batch)
        except BaseException as e:  # noqa: BLE001 - every pass of the call gets the error
            for p in batch:
                p.error = e
        finally:
            self._cv.acquire()
            for p in batch:
                p.done = True
            self.passes, self.parts_run, self._running = self.passes + 1, self.parts_run + len(batch), False
            self._cv.notify_all()
