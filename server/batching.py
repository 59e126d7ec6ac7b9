"""Dynamic batching: concurrent TopK requests share one forward pass, in front of the model's executor.

Requests wait in a bounded queue (`ServerConfig.max_queue` jobs waiting or running; one more raises
ResourceExhaustedError at once). One collector coroutine takes the oldest job and keeps adding waiting
TopK jobs until `batch_wait_ms` after that job arrived, or until the batch would pass `batch_tokens`
(estimated, see `estimate_tokens`) or `max_batch_requests`. In the model's thread, just before the
forward pass, jobs whose deadline passed or whose call was cancelled are dropped (counted in
`BatchStats`), so they never reach the model; then one `Index.encode` over the samples of all the
others, and each job's searches on its own rows of the features (`Features.select`). The searches of a
batch share one `Index.row_probs`: a training row among the candidates of several queries has its
next-token distributions (the costly part of an exact score, |V|·d per token) computed once per batch, and
in two phases (`Index.run_pass`): every search runs up to the rows it first scores exactly, those rows'
distributions are computed together in a few large products, then every search finishes.

One batch is in the model's executor at a time: requests arriving meanwhile wait here and form the next
batch, so batches grow with the load by themselves and an idle server adds at most `batch_wait_ms`.

Exactness: positions are explicit and features do not depend on which samples share a pass
(indexer/forward.py), so a batched answer equals `top_k`, the per-request reference (tested).
If the shared pass fails, its jobs are retried one by one, so each gets its own answer or error.

Versions: a batch reads the served version once, when it starts in the model's thread, and answers all
its jobs from it; a swap takes effect at the next batch and never mixes versions in a response.

Un-batched calls (ScoreAll) go through the same queue and executor, alone, with the same drop rules.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forvalue.indexer.errors import DeadlineExceededError, NotReadyError, ResourceExhaustedError
from forvalue.indexer.index import Index, Steps
from forvalue.indexer.results import GroupedResult, SearchResult

from .config import ServerConfig
from .convert import TopKQuery, estimate_tokens

if TYPE_CHECKING:
    from forvalue.indexer.features import Features
    from forvalue.indexer.rerank import RowProbs


log = logging.getLogger("forvalue.server")

# group-by scores every training row in scope exactly; above this many rows a request must narrow with where
MAX_GROUP_ROWS = 200_000
# A call cancelled with less than this left counts as expired: the client gives up at its own deadline,
# which comes a little before the server's (transit, rounding of the grpc-timeout header).
DEADLINE_SLACK = 0.1


def answers(index: Index, query: TopKQuery, features: Features, check: Callable[[], None] | None = None
            ) -> list[tuple[int, SearchResult | GroupedResult]]:
    """The answers to a TopK query from its samples' features (`features`: of `query.samples`, in order);
    `check` is called between the steps of the work."""
    return index.answers(features, query.k, query.directions, query.rerank, query.group, query.explain_pairs,
                         query.where, query.group_by, MAX_GROUP_ROWS, check, query.scores, query.exact_budget)


def answer_steps(index: Index, query: TopKQuery, features: Features, check: Callable[[], None] | None,
                 shared: RowProbs) -> Steps:
    """`answers` as steps (`Index.answer_steps`), for the two-phase pass of a batch (`Index.run_pass`)."""
    return index.answer_steps(features, query.k, query.directions, query.rerank, query.group, query.explain_pairs,
                              query.where, query.group_by, MAX_GROUP_ROWS, check, query.scores, query.exact_budget,
                              shared)


def top_k(index: Index, query: TopKQuery, check: Callable[[], None] | None = None
          ) -> list[tuple[int, SearchResult]]:
    """The unbatched reference: one forward pass for the query's samples alone, then its searches."""
    return answers(index, query, index.encode(query.samples), check)


@dataclass
class BatchStats:
    """Counters of the batcher (read by tests, later by metrics); updated under a lock from two threads.

    Attributes:
        forward_passes: Index.encode calls (one per batch; one per job when a batch's pass failed).
        batched_requests: TopK requests that reached a forward pass.
        max_batch_seen: most TopK requests that shared one forward pass.
        dropped_expired: requests dropped before the model because their deadline had passed.
        dropped_cancelled: requests dropped before the model because their call was cancelled.
        row_tokens_computed: training rows' tokens whose next-token distributions a batch's exact scores
            computed (Index.row_probs); row_tokens_reused: those asked for again in the batch (by another search or
            a later step) and served from memory.
    """

    forward_passes: int = 0
    batched_requests: int = 0
    max_batch_seen: int = 0
    dropped_expired: int = 0
    dropped_cancelled: int = 0
    row_tokens_computed: int = 0
    row_tokens_reused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def saw_batch(self, n: int) -> None:
        with self._lock:
            self.batched_requests += n
            self.max_batch_seen = max(self.max_batch_seen, n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


class StoppedError(Exception):
    """A job's work stopped because its call was cancelled (an Exception, not asyncio.CancelledError, so it
    stays inside the job in the model's thread)."""


@dataclass(eq=False)  # identity: a job is removed from the queue by `is`, never by value
class Job:
    """One request waiting for the model: a TopK query (batched) or an un-batched call on the served version.

    Attributes:
        query: the TopK query, or None for a call.
        call: fn(served, check) for an un-batched call (ScoreAll), or None for a TopK query; `check` is the
            job's `check`, to call between steps of the work.
        deadline: time.monotonic() after which the answer is useless; None = no deadline.
        future: resolved on the event loop with (version, result).
        arrived: loop time of submission (the batch wait counts from the oldest job's arrival).
        tokens: estimated tokens of the query's samples.
        cancelled: set on the event loop when the call is cancelled, read in the model's thread.
    """

    query: TopKQuery | None
    call: Callable[[Index, Callable[[], None]], Any] | None
    deadline: float | None
    future: asyncio.Future
    arrived: float
    tokens: int = 0
    cancelled: bool = False

    def check(self) -> None:
        """In the model's thread, between steps of this job's work: stop it once its deadline has passed or
        its call was cancelled (raises DeadlineExceededError; StoppedError for a cancelled call, whose answer
        nobody reads)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceededError("the call's deadline passed while it was being answered; the work was "
                                        "stopped (ask for less, or allow more time)")
        if self.cancelled:
            raise StoppedError("the call was cancelled while it was being answered")


class Batcher:
    """The queue in front of the model's executor, and the coroutine that forms batches from it.

    Args:
        config: batch_wait_ms, batch_tokens, max_batch_requests and max_queue.
        executor: the model's executor (one worker).
        served: returns the version being served now (swapped atomically by the servicer).
    """

    def __init__(self, config: ServerConfig, executor: Executor, served: Callable[[], Index | None]):
        self._wait = config.batch_wait_ms / 1000.0
        self._max_tokens = config.batch_tokens
        self._max_requests = config.max_batch_requests
        self._max_queue = config.max_queue
        self._executor = executor
        self._served = served
        self.stats = BatchStats()
        self.on_pass: Callable[[int], None] | None = None  # called with each forward pass's TopK requests
        self._pending: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._open = 0  # jobs submitted and not yet answered: waiting or in the running batch
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        """Requests waiting for the model or in its running batch."""
        return self._open

    async def top_k(self, query: TopKQuery, deadline: float | None = None
                    ) -> tuple[str, list[tuple[int, SearchResult]]]:
        """(version, answers) to a TopK query, from a forward pass it may share with other requests.

        Raises:
            ResourceExhaustedError: the queue is full. DeadlineExceededError: `deadline` passed before
            the request reached the model. NotReadyError: the server is stopping. What the library raised.
        """
        return await self._submit(query, None, deadline, estimate_tokens(query.samples))

    async def call(self, fn: Callable[[Index, Callable[[], None]], Any], deadline: float | None = None
                   ) -> tuple[str, Any]:
        """(version, fn(served, check)) run alone in the model's executor, after the jobs queued before it
        (`check` raises once the deadline passed or the call was cancelled: call it between steps).

        Raises:
            as `top_k`.
        """
        return await self._submit(None, fn, deadline, 0)

    async def _submit(self, query, fn, deadline, tokens):
        if self._closed:
            raise NotReadyError("the server is stopping; retry on another replica or later")
        if deadline is not None and time.monotonic() >= deadline:
            self.stats.add(dropped_expired=1)
            raise DeadlineExceededError("the call's deadline passed before it reached the model")
        if self._max_queue is not None and self._open >= self._max_queue:
            raise ResourceExhaustedError(f"the server's queue is full ({self._max_queue} requests waiting for "
                                         "the model); retry later with backoff")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():  # first call, or the collector died of a bug (logged)
            if self._task is not None and not self._task.cancelled():
                log.error("the batch collector stopped; restarting it", exc_info=self._task.exception())
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._collect(), name="forvalue-batcher")
        job = Job(query, fn, deadline, loop.create_future(), loop.time(), tokens)
        self._open += 1
        self._pending.append(job)
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the model's thread drops it if its batch has not started yet
            if any(j is job for j in self._pending):
                self._pending.remove(job)
                self._count_drop(job, time.monotonic())
            raise
        finally:
            self._open -= 1

    def _count_drop(self, job: Job, now: float) -> BaseException | None:
        """Count `job` as dropped and return its error if it expired or was cancelled; None if it is live.

        A call cancelled because its deadline passed (within DEADLINE_SLACK) counts as expired.
        """
        slack = DEADLINE_SLACK if job.cancelled else 0.0
        if job.deadline is not None and now >= job.deadline - slack:
            self.stats.add(dropped_expired=1)
            return DeadlineExceededError("the call's deadline passed before it reached the model")
        if job.cancelled:
            self.stats.add(dropped_cancelled=1)
            return asyncio.CancelledError()
        return None

    # --- the event loop side: forming batches ------------------------------------------------------

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [self._pending.popleft()]
            self._running = batch  # from here on `close` answers these jobs if the collector is stopped
            if batch[0].query is not None:
                await self._fill(batch)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run, batch)
            except asyncio.CancelledError:
                raise  # `close` answers the batch's jobs
            except Exception as exc:  # the executor is shut down, or a bug here: each job gets the error
                log.exception("a batch of %d requests failed outside the library", len(batch))
                outcomes = [(job, None, exc) for job in batch]
            self._running = []
            for job, result, error in outcomes:
                if job.future.done():  # the call was cancelled while its batch ran
                    continue
                if isinstance(error, asyncio.CancelledError):
                    job.future.cancel()
                elif error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)

    async def _fill(self, batch: list[Job]) -> None:
        """Add waiting TopK jobs to `batch` until it is full or `batch_wait_ms` after its first job arrived."""
        loop = asyncio.get_running_loop()
        until = batch[0].arrived + self._wait
        tokens = batch[0].tokens
        while len(batch) < self._max_requests:
            if self._pending:
                job = self._pending[0]
                if job.query is None or tokens + job.tokens > self._max_tokens:
                    return  # a call runs alone; a job over the budget starts the next batch
                batch.append(self._pending.popleft())
                tokens += job.tokens
                continue
            left = until - loop.time()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    async def close(self) -> None:
        """Stop the collector; calls still waiting get NotReadyError (UNAVAILABLE)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in [*self._pending, *self._running]:
            if not job.future.done():
                job.future.set_exception(NotReadyError("the server is stopping; retry on another replica or later"))
        self._pending.clear()

    # --- the model's thread: one batch --------------------------------------------------------------

    def _run(self, jobs: list[Job]) -> list[tuple[Job, Any, BaseException | None]]:
        """(job, (version, result), error) for every job of a batch; runs in the model's executor."""
        served = self._served()  # once: every job of this batch is answered by the same version
        now = time.monotonic()
        out: list[tuple[Job, Any, BaseException | None]] = []
        live = []
        for job in jobs:
            dropped = self._count_drop(job, now)
            if dropped is None:
                live.append(job)
            else:
                out.append((job, None, dropped))
        if not live:
            return out
        if live[0].call is not None:
            assert len(live) == 1, "an un-batched call shares its turn with nothing"
            job = live[0]
            return out + [self._guard(job, lambda: (served.version.name, job.call(served, job.check)))]
        self.stats.saw_batch(len(live))
        self._forward_pass(len(live))
        try:
            features = served.encode([s for job in live for s in job.query.samples])
        except Exception as exc:
            if len(live) == 1:
                return out + [(live[0], None, exc)]
            log.warning("a shared forward pass of %d requests failed (%s: %s); answering them one by one",
                        len(live), type(exc).__name__, exc)
            return out + [self._alone(served, job) for job in live]
        a = 0
        shared = served.row_probs()  # a training row among several queries' candidates: its distributions once
        steps = []
        for job in live:
            n = len(job.query.samples)
            part = features if len(live) == 1 else features.select(list(range(a, a + n)))
            a += n
            steps.append(answer_steps(served, job.query, part, job.check, shared))
        for job, (result, error) in zip(live, served.run_pass(steps, shared)):
            out.append((job, None, error) if error is not None else (job, (served.version.name, result), None))
        self.stats.add(row_tokens_computed=shared.computed_tokens, row_tokens_reused=shared.reused_tokens)
        return out

    def _alone(self, served: Index, job: Job) -> tuple[Job, Any, BaseException | None]:
        dropped = self._count_drop(job, time.monotonic())
        if dropped is not None:
            return job, None, dropped
        self._forward_pass(1)
        return self._guard(job, lambda: (served.version.name, top_k(served, job.query, job.check)))

    def _forward_pass(self, n: int) -> None:
        """Count a forward pass of `n` TopK requests (model's thread)."""
        self.stats.add(forward_passes=1)
        if self.on_pass is not None:
            self.on_pass(n)

    @staticmethod
    def _guard(job: Job, fn: Callable[[], Any]) -> tuple[Job, Any, BaseException | None]:
        try:
            return job, fn(), None
        except Exception as exc:  # this job's own error, mapped to its status by the servicer
            return job, None, exc
