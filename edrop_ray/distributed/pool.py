"""The evaluators' health in one object (as RLlib's ``FaultTolerantActorManager`` keeps it).

:class:`EvaluatorPool` holds the evaluator actors and which of them are live. It sends one call
to many of them and waits with a timeout (:meth:`EvaluatorPool.foreach`), spreads work items over
the live ones and re-runs an item whose evaluator died or hung on another one
(:meth:`EvaluatorPool.map`), and probes the ones marked dead so that an evaluator Ray restarted
comes back (:meth:`EvaluatorPool.probe`). It knows nothing of populations or weights: the
coordinator says what to call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

__all__ = ["EvaluatorPool", "InputsLost"]


class InputsLost(RuntimeError):
    """The weights or the batch of a generation are gone (their owner, the trainer, died)."""


def _inputs_lost(e: Exception) -> bool:
    # An evaluator's own death is a bare RayActorError. A task error *caused* by a dead actor or
    # a lost object means an input (made by the trainer) could not be had.
    if isinstance(e, ObjectLostError):
        return True
    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
    return isinstance(cause, ObjectLostError | RayActorError)


class EvaluatorPool:
    """Evaluator actors, their live set, probes of the dead ones, timeouts and re-runs."""

    def __init__(self, actors: Sequence[Any], timeout_s: float):
        self.actors = list(actors)
        self.timeout_s = timeout_s  # for one call, and for one map() once nothing comes back
        self.live = [True] * len(self.actors)
        self.reruns = 0  # items re-run on another evaluator, over the pool's life
        self._probes: dict[int, ray.ObjectRef] = {}  # liveness probes of evaluators marked dead

    def __len__(self) -> int:
        return len(self.actors)

    def num_healthy(self) -> int:
        return sum(self.live)

    def healthy(self) -> list[int]:
        """Indices of the live evaluators; all of them when every one is marked dead (then they
        are all tried again rather than giving up)."""
        return [i for i, ok in enumerate(self.live) if ok] or list(range(len(self.actors)))

    def set_healthy(self, indices: Sequence[int], ok: bool = True) -> None:
        for i in indices:
            self.live[i] = ok

    def foreach(
        self,
        call: Callable[[int, Any], ray.ObjectRef],
        indices: Sequence[int],
        others: dict[ray.ObjectRef, int] | None = None,
        results: dict[int, Any] | None = None,
    ) -> tuple[list[int], Exception | None]:
        """``call(i, actor)`` on evaluators ``indices``, all waited for together with the calls
        ``others`` (ref -> -1: not an evaluator, e.g. the trainer's side of a collective).

        Returns the evaluators that failed or hung (marked dead) and the first error seen (also
        one a rank got because *another* rank died); ``results``, when given, receives each
        evaluator's answer by index. Raises InputsLost when a non-evaluator's actor is gone.
        """
        refs = dict(others or {})
        for i in indices:
            refs[call(i, self.actors[i])] = i
        # the calls themselves time out after timeout_s; the margin covers their start
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s + 30)
        failed: list[int] = []
        error: Exception | None = None
        for ref, who in refs.items():
            if ref not in ready:
                error = error or TimeoutError(f"rank of evaluator {who} hung")
                if who >= 0:
                    failed.append(who)
                continue
            try:
                value = ray.get(ref, timeout=self.timeout_s)
                if results is not None and who >= 0:
                    results[who] = value
            except RayActorError as e:
                if who < 0:
                    raise InputsLost(f"the trainer is gone: {e}") from e
                failed.append(who)
                error = e
            except (RayTaskError, GetTimeoutError, ObjectLostError) as e:
                # a collective that failed because *another* rank died: not this rank's fault,
                # unless it is an evaluator that is not in the group (restarted)
                if who >= 0 and ("in no group" in str(e) or "not in group" in str(e)):
                    failed.append(who)
                error = error or e
        self.set_healthy(failed, False)
        return failed, error

    def map(self, call: Callable[[Any, int], ray.ObjectRef], num_items: int) -> list[Any]:
        """Items ``0..num_items-1`` spread over the healthy evaluators, ``call(actor, item)``
        each; the results in item order, whoever finished first.

        An evaluator that dies, fails or is still out ``timeout_s`` after the last progress is
        marked dead and its item re-run on a live one. Raises InputsLost when a call failed for
        want of its inputs (no evaluator could do better), RuntimeError when none is left.
        """
        healthy = self.healthy()
        results: dict[int, Any] = {}
        pending: dict[ray.ObjectRef, tuple[int, int]] = {}

        def submit(item: int, worker: int) -> None:
            pending[call(self.actors[worker], item)] = (item, worker)

        for item in range(num_items):
            submit(item, healthy[item % len(healthy)])
        deadline = time.monotonic() + self.timeout_s
        turn = 0
        last_error: Exception | None = None
        while pending:
            timeout = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            failed: list[tuple[int, int]] = []
            if not ready:  # the time is up: whoever is still out is late
                failed = list(pending.values())
                pending.clear()
            for ref in ready:
                item, worker = pending.pop(ref)
                try:
                    results[item] = ray.get(ref, timeout=self.timeout_s)
                except (RayActorError, RayTaskError, GetTimeoutError, ObjectLostError) as e:
                    if _inputs_lost(e):  # not the evaluator's fault: no one can do this item
                        raise InputsLost(f"the inputs of item {item} are gone: {e}") from e
                    failed.append((item, worker))
                    last_error = e
            for item, worker in failed:
                self.live[worker] = False
                others = [i for i, ok in enumerate(self.live) if ok]
                if not others:
                    raise RuntimeError(f"every evaluator failed or timed out: {last_error!r}")
                self.reruns += 1
                submit(item, others[turn % len(others)])
                turn += 1
            if failed:
                deadline = time.monotonic() + self.timeout_s
        self.probe()
        return [results[i] for i in range(num_items)]

    def probe(self) -> None:
        """Give evaluators marked dead another chance once Ray has restarted them.

        A probe is sent once and only looked at (timeout 0) on each call, so an evaluator whose
        node is gone for good never makes anyone wait.
        """
        for i, ok in enumerate(self.live):
            if ok:
                continue
            probe = self._probes.setdefault(i, self.actors[i].identity.remote())
            ready, _ = ray.wait([probe], timeout=0)
            if not ready:
                continue
            del self._probes[i]
            try:
                ray.get(probe, timeout=1.0)
                self.live[i] = True
            except (RayActorError, RayTaskError, GetTimeoutError):
                pass  # still down: a new probe goes out next time
