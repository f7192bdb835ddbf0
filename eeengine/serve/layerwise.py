"""Layer-wise continuous batching: one queue per depth.

An encoder batch cannot be refilled the way an LLM's decode batch is: rows at different depths
need different layer weights. So the worker keeps one queue per depth (inputs that have run
layers 1..d and wait for layer d + 1); new inputs enter at layer 1 while survivors of earlier
requests go deeper, and inputs at the same depth, from any requests, run together in one layer
call, right-padded to the longest of them. Where that padding would cost more than another
call (the engine's ``split_cost``, as in ``Engine.predict``), new inputs are cut into calls
of similar lengths, and the groups waiting at a depth merge only with groups of similar width.
After the call, inputs that exit are answered at once and the rest move to the next depth's
queue. One input alone in the server (no other pending, none in flight) runs the whole loop in
one call where the executor can (the ONNX Runtime executor's row graph,
:mod:`eeengine.executors.row_graph`, from the second such input on:
:meth:`eeengine.runtime.ExitLoop.row_loop`); an input arriving meanwhile waits for that call,
not for a layer boundary.

Which depth runs next (``schedule``; new inputs compete as the queue of depth 0):

- ``"fullest"``: the queue with the most inputs waiting (a tie goes to the deeper queue, whose
  inputs are closer to done). A layer call costs a fixed overhead plus work per token, so this
  spends the overhead on the most inputs; but under a steady stream of arrivals the new-input
  queue is often the fullest, and the few inputs left at a deep layer wait until it is not:
  that is the tail latency.
  So once an input has waited ``max_wait_ms`` since its arrival, the queue holding the
  longest-waiting input runs first (every input waiting at that depth joins the call).
- ``"oldest"``: always the queue holding the longest-waiting input (first come, first
  served). An input in flight is never passed over for a later arrival, so a request's cohort
  runs to its end before the next one starts, and rows of different requests rarely merge:
  close to the static batcher.

Every layer runs through the engine's own loop pieces (:class:`eeengine.runtime.ExitLoop`:
``start``, ``step``, ``select``), so each input gets the same logits and exit layer as
``Engine.predict`` whatever it was batched with (tested over random arrival orders), except at
int8, whose activation scale is taken over each layer call's rows (README, Precision).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eeengine.batching import length_sorted_batches
from eeengine.runtime import ExitLoop, LiveRows
from eeengine.serve import SCHEDULES
from eeengine.serve.batcher import Batcher, Row


@dataclass(eq=False)
class _Group:
    """Inputs at the same depth: their live state and, row by row, which input each is."""

    live: LiveRows
    rows: list[Row]

    @property
    def width(self) -> int:
        return self.live.attention_mask.shape[1]


class LayerwiseBatcher(Batcher):
    """Layer-wise continuous batching over an engine's :class:`ExitLoop`.

    Args:
        loop: the engine's loop (:meth:`eeengine.Engine.exit_loop`).
        schedule: which depth runs next, one of :data:`SCHEDULES` (see the module docstring).
        max_wait_ms: ``"fullest"``: an input waiting longer than this (ms since its arrival)
            makes the longest-waiting queue run next; None: never.
        **limits: the arguments of :class:`eeengine.serve.batcher.Batcher`; the limits apply to
            every layer call.

    Raises:
        ValueError: an unknown ``schedule``.
    """

    name = "continuous"

    def __init__(
        self,
        loop: ExitLoop,
        schedule: str = "fullest",
        max_wait_ms: float | None = 25.0,
        **limits: object,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
        super().__init__(**limits)
        self._loop = loop
        self._oldest_first = schedule == "oldest"
        self._max_wait = None if max_wait_ms is None else max_wait_ms / 1000
        # layers done -> groups waiting for the next layer, oldest first
        self._queues: dict[int, list[_Group]] = {d: [] for d in range(1, self.num_layers)}

    def _has_work(self) -> bool:
        return bool(self._pending) or any(self._queues.values())

    def _waiting(self) -> int:
        deep = sum(len(g.rows) for groups in self._queues.values() for g in groups)
        return len(self._pending) + deep

    def _pick(self) -> int:
        """Layers done by the inputs to run next (0: new inputs), by the schedule."""
        if self._oldest_first or self._max_wait is not None:  # else no rule asks who is oldest
            done, arrival = self._oldest()
            if self._oldest_first or time.perf_counter() - arrival > self._max_wait:
                return done
        return self._fullest()

    def _fullest(self) -> int:
        """The fullest queue, ties to the deeper one."""
        best, most = 0, len(self._pending)
        for done, groups in self._queues.items():
            count = sum(len(g.rows) for g in groups)
            if count and count >= most:
                best, most = done, count
        return best

    def _oldest(self) -> tuple[int, float]:
        """The queue holding the earliest arrival (ties to the deeper one), and that arrival
        (``time.perf_counter()`` seconds)."""
        best, first = 0, self._pending[0][0].arrival if self._pending else float("inf")
        for done, groups in self._queues.items():
            for group in groups:
                arrival = min(job.arrival for job, _ in group.rows)
                if arrival <= first:
                    best, first = done, arrival
        return best, first

    def _iteration(self) -> None:
        done = self._pick()
        if done == 0:
            rows = self._take_pending()
            alone = len(rows) == 1 and not any(self._queues.values())
            row_loop = self._loop.row_loop(1) if alone else None
            if row_loop is not None:
                # Alone in the server: the executor runs the whole loop in one call (the row
                # graph), instead of stopping at layer boundaries where no other input waits.
                self._run_whole(rows, row_loop)
                return
            calls = self._cut(self._start(rows)) if rows else []
        else:
            calls = self._merge_similar(self._take(done))
        for call in calls:
            try:
                self._step(call, done + 1)
            except Exception as error:  # never kill the worker: fail this call's jobs only
                self._fail({job for job, _ in call.rows}, error)

    def _start(self, rows: list[Row]) -> _Group:
        """New inputs, embedded."""
        return _Group(self._loop.start(*self._collate(rows)), rows)

    def _cut(self, group: _Group) -> list[_Group]:
        """New inputs as layer calls of similar widths, longest first: cut where a cut saves
        more than ``split_cost`` padded tokens (:func:`length_sorted_batches`)."""
        if self.split_cost == math.inf:
            return [group]
        lengths = group.live.attention_mask.sum(1).tolist()
        parts = length_sorted_batches(lengths, len(lengths), self.split_cost)
        if len(parts) == 1:
            return [group]
        return [self._select(group, torch.tensor(part)) for part in parts]

    def _merge_similar(self, groups: list[_Group]) -> list[_Group]:
        """Groups of one depth as layer calls: widest first, each merged into the call before
        it unless padding its rows to that call's width costs more than ``split_cost`` padded
        tokens (one call). Groups are never split: their rows were cut when they started."""
        calls: list[list[_Group]] = []
        for group in sorted(groups, key=lambda g: -g.width):
            if calls and len(group.rows) * (calls[-1][0].width - group.width) <= self.split_cost:
                calls[-1].append(group)
            else:
                calls.append([group])
        return [self._merge(call) for call in calls]

    def _take(self, done: int) -> list[_Group]:
        """The oldest groups of queue ``done`` that fit the limits together (the last one split
        if only part of it fits; at least one input)."""
        groups = self._queues[done]
        taken: list[_Group] = []
        count = width = 0
        while groups:
            head = groups[0]
            wider = max(width, head.width)
            room = min(self.max_batch_requests, self.max_batch_tokens // wider) - count
            if room >= len(head.rows):
                taken.append(groups.pop(0))
                count, width = count + len(head.rows), wider
                continue
            room = room if taken else max(room, 1)
            if room > 0:
                taken.append(self._select(head, torch.arange(room)))
                groups[0] = self._select(head, torch.arange(room, len(head.rows)))
            break
        return taken

    def _select(self, group: _Group, index: torch.Tensor) -> _Group:
        """The rows ``index`` (int64, or a bool mask) of ``group``."""
        live = self._loop.select(group.live, index.to(group.live.hidden_states.device))
        keep = index.nonzero().flatten() if index.dtype == torch.bool else index
        return _Group(live, [group.rows[i] for i in keep.tolist()])

    def _merge(self, groups: list[_Group]) -> _Group:
        """One group of all rows of ``groups``, right-padded to the widest."""
        if len(groups) == 1:
            return groups[0]
        width = max(g.width for g in groups)
        lives = [g.live for g in groups]
        attention_mask = torch.cat(
            [F.pad(x.attention_mask, (0, width - x.attention_mask.shape[1])) for x in lives]
        )
        live = LiveRows(
            rows=torch.arange(attention_mask.shape[0], device=attention_mask.device),
            hidden_states=torch.cat(
                [F.pad(x.hidden_states, (0, 0, 0, width - x.hidden_states.shape[1])) for x in lives]
            ),
            attention_mask=attention_mask,
            mask=self._loop.executor.mask(attention_mask),
            state={k: torch.cat([x.state[k] for x in lives]) for k in lives[0].state},
            memory=torch.cat([F.pad(x.memory, (0, width - 1 - x.memory.shape[1])) for x in lives]),
        )
        return _Group(live, [row for g in groups for row in g.rows])

    def _step(self, group: _Group, layer: int) -> None:
        """Run ``layer`` on ``group``: answer the inputs that exit, queue the others for the
        next layer. Inputs of cancelled jobs are dropped first."""
        cancelled = [job.cancelled for job, _ in group.rows]
        if any(cancelled):
            if all(cancelled):
                return
            group = self._select(group, ~torch.tensor(cancelled))
        live, rows = group.live, group.rows
        live.rows = torch.arange(len(rows), device=live.hidden_states.device)
        self.metrics.observe_batch(len(rows), group.width)
        out = self._loop.outputs(len(rows), live.hidden_states.device)
        exit_mask = self._loop.step(live, layer, out)
        exits = exit_mask.tolist()
        if any(exits):
            exited = [row for row, e in zip(rows, exits, strict=True) if e]
            self._finish(exited, out.logits[exit_mask], [layer] * len(exited))
        if not any(exits):  # nobody exited: the group goes on as it is (no copy)
            self._queues[layer].append(group)
        elif not all(exits):
            self._queues[layer].append(self._select(group, ~exit_mask.cpu()))
