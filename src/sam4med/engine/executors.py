"""Where the item loop's per-image work runs: in this process, or on the actors of a Ray cluster.

The loop (:func:`sam4med.engine.items.run_items`) keeps the bookkeeping: what is done, the one writer of
``results.jsonl``, progress. An executor only turns items into outcomes, each computed by the same
per-image function. On Ray that function (with the model inside it) is put in the object store once and
each actor deserialises it once, when it starts, so a model is loaded once per actor, not once per image.
Ray is optional (``pip install 'sam4med[distributed]'``).
"""

from __future__ import annotations

import errno
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sam4med.engine.errors import InputError, missing_package, one_line

if TYPE_CHECKING:
    from sam4med.engine.items import WorkItem

ItemProcess = Callable[["WorkItem"], list[dict]]


@dataclass
class Outcome:
    """One item's rows, or the one-line reason it failed; ``fatal`` is an error that stops the whole run
    (a disk that refuses writes), raised again by the loop."""

    item: WorkItem
    rows: list[dict] | None
    error: str | None
    seconds: float
    fatal: OSError | None = None


STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})  # a disk that refuses


def failure_message(error: BaseException) -> str:
    """One line: the InputError's own, or the type, message and the function that raised it."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, InputError):
        return message
    return f"{type(error).__name__}: {message} ({traceback.extract_tb(error.__traceback__)[-1].name})"


def run_one(process: ItemProcess, item: WorkItem) -> Outcome:
    start = time.perf_counter()
    try:
        rows = process(item)
    except Exception as error:  # a batch run records any failure and goes on, unless the disk refuses
        fatal = error if isinstance(error, OSError) and error.errno in STORAGE_ERRORS else None
        return Outcome(item, None, failure_message(error), time.perf_counter() - start, fatal)
    return Outcome(item, rows, None, time.perf_counter() - start)


class Executor(Protocol):
    def outcomes(self, process: ItemProcess, items: Sequence[WorkItem]) -> Iterator[Outcome]:
        """Each item's outcome, in the order they finish."""


class LocalExecutor:
    """One item after another in this process."""

    def outcomes(self, process: ItemProcess, items: Sequence[WorkItem]) -> Iterator[Outcome]:
        for item in items:
            yield run_one(process, item)


class _Worker:
    """A Ray actor's body: holds the per-image function, runs items on it."""

    def __init__(self, process: ItemProcess, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.process = process

    def run(self, item: WorkItem) -> Outcome:
        return run_one(self.process, item)


def ray_module():  # noqa: ANN201 - the ray package, when installed
    try:
        import ray
    except ImportError:
        raise missing_package("--ray", "Ray", "'sam4med[distributed]'") from None
    return ray


class RayExecutor:
    """Items spread over ``workers`` Ray actors of ``threads`` CPUs each, two items queued per actor.

    ``address``: ``auto`` joins the cluster this machine is part of (``ray start``, ``RAY_ADDRESS``) or
    starts a local one; otherwise a cluster address (``ray://host:10001`` or ``host:6379``). ``workers``
    defaults to the cluster's CPUs divided by ``threads``. An actor that dies is replaced and its items are
    sent again (``retries`` times each); an item whose worker keeps dying becomes an error row."""

    retries = 2

    def __init__(self, address: str = "auto", workers: int | None = None, threads: int = 1):
        if workers is not None and workers < 1:
            raise InputError(f"--ray-workers {workers}: must be >= 1")
        if threads < 1:
            raise InputError(f"--threads {threads}: must be >= 1")
        ray_module()  # without Ray, say so before a model loads
        self.address, self.workers, self.threads = address, workers, threads

    def _connect(self):  # noqa: ANN202 - the ray package
        ray = ray_module()
        if not ray.is_initialized():
            try:
                ray.init(address=None if self.address == "auto" else self.address, include_dashboard=False,
                         log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, ValueError, RuntimeError) as error:
                raise InputError(f"--ray {self.address}: cannot join the cluster ({one_line(error)})") from None
        return ray

    def outcomes(self, process: ItemProcess, items: Sequence[WorkItem]) -> Iterator[Outcome]:
        if not items:
            return
        ray = self._connect()
        count = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.threads)
        actor_class = ray.remote(num_cpus=self.threads)(_Worker)
        shared = ray.put(process)
        actors = [actor_class.remote(shared, self.threads) for _ in range(min(count, len(items)))]
        queue = list(reversed(items))  # popped from the end: in order
        attempts: dict[tuple[str, str], int] = {}
        in_flight: dict[object, tuple[WorkItem, object]] = {}

        def submit(actor: object) -> None:
            if queue:
                item = queue.pop()
                in_flight[actor.run.remote(item)] = (item, actor)  # type: ignore[attr-defined]

        for actor in actors:
            submit(actor)
            submit(actor)
        try:
            while in_flight:
                (ready,), _ = ray.wait(list(in_flight), num_returns=1)
                item, actor = in_flight.pop(ready)
                try:
                    outcome = ray.get(ready)
                except ray.exceptions.RayActorError as error:  # the worker died (killed, out of memory, lost node)
                    attempts[item.key] = attempts.get(item.key, 0) + 1
                    if actor in actors:  # its other queued item fails the same way: one new actor for both
                        actors[actors.index(actor)] = replacement = actor_class.remote(shared, self.threads)
                    else:
                        replacement = next(a for a in actors if a is not actor)
                    if attempts[item.key] <= self.retries:
                        queue.append(item)
                        submit(replacement)
                        continue
                    outcome = Outcome(item, None, f"Ray worker died {attempts[item.key]} times on this image: "
                                                  f"{one_line(error)[:200]}", 0.0)
                    actor = replacement
                except ray.exceptions.RayError as error:
                    outcome = Outcome(item, None, f"Ray: {one_line(error)[:300]}", 0.0)
                submit(actor)
                yield outcome
        finally:
            for actor in actors:
                ray.kill(actor)


def make_executor(ray_address: str | None, workers: int | None = None, threads: int | None = None) -> Executor:
    """The executor of a command's ``--ray`` / ``--ray-workers`` / ``--threads`` options (with Ray, ``threads`` is
    each worker's, on whatever machine it runs: unset is 1, 0 is refused)."""
    if ray_address is None:
        if workers is not None:
            raise InputError("--ray-workers: only with --ray")
        return LocalExecutor()
    return RayExecutor(ray_address, workers, 1 if threads is None else threads)
