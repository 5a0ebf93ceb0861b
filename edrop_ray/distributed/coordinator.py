"""The coordinator actor: it owns the population, farms each generation out to the evaluators
and selects. It wraps a :class:`~edrop_ray.search.Search`, splits the candidates of a
generation into shards and has its :class:`~edrop_ray.distributed.pool.EvaluatorPool` (the
evaluators' health: live set, probes, re-runs) judge them.

It holds states, never a model: this module imports neither torchvision nor Torch-Pruning, so
the coordinator's process boots on torch and Ray alone (seconds of CPU fewer than an actor
that holds a model). ``tests/test_ray.py`` checks that it stays so.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from ..config import Config
from ..files import pack_rows, pack_states, unpack_rows
from ..search import Search
from .pool import EvaluatorPool, InputsLost

__all__ = ["Coordinator"]


class Coordinator:
    """Owns the population; farms each generation out to the evaluators and selects.

    With the collective transport it also keeps the process group: before a generation it
    makes sure every live evaluator holds the generation's weights, re-forming the group from
    the live ranks when one was lost or came back. Over the group, the evaluators propose
    their own members' trials: the coordinator's work per generation is then a pack of the
    population and the selection, not the DE's O(S D) random draws.

    On the other paths it proposes the next generation as soon as it has selected, in a
    thread of its own, while the trainer trains: a proposal depends on the population only
    (each member's trial has a random stream of its own, :class:`~edrop_ray.search.Proposer`),
    never on the weights, so the trials are the same whoever proposes them, and when.
    """

    def __init__(
        self, cfg: Config, num_units: int, evaluators: list, trainer=None,
        transport: tuple[str, str] = ("object_store", ""), counter=None,
    ):  # fmt: skip
        self.cfg = cfg
        self.search = Search.from_config(
            cfg, num_units, counter=counter
        )  # counter: budget.Counter or None
        self.pool = EvaluatorPool(evaluators, cfg.generation_timeout_s)
        self.trainer = trainer
        self.transport, self.backend = transport
        self.lost_in_sync = 0  # evaluators lost while the weights went out
        self.members: list[int] | None = None  # evaluators in the current group, by index
        self.epoch = -1  # the group's formation number
        self.regroups = 0
        self.grouped = 0  # generations judged over the process group (one call in all)
        self.serving: dict[int, ray.ObjectRef] = {}  # evaluator -> its serving loop
        self.synced = -1  # the weights version every member holds
        # the trainer's side of each broadcast, and where each generation's time went
        self.sync_log: deque[dict[str, float]] = deque(maxlen=1000)
        self.timings: deque[dict[str, Any]] = deque(maxlen=1000)
        # the next generation's candidates, being proposed
        self._ahead: Future | None = None
        self._proposer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="propose")

    def set_transport(self, transport: tuple[str, str]) -> None:
        """(transport, backend), chosen once every rank has said where it landed: the runtime
        learns that only after it asked for the coordinator beside the other actors."""
        self.transport, self.backend = transport

    def generation(
        self, batch: list[ray.ObjectRef], weights: list[ray.ObjectRef] | None, version: int
    ) -> dict[str, Any]:
        """Propose, evaluate across evaluators, select; return the record and the best state
        (the population stays here: :meth:`population` hands it out when asked, S x D bits
        that the driver needs only for its snapshots).

        Over the process group the evaluators propose their own shards' trials (the search's
        :class:`~edrop_ray.search.Proposer`, the same trials); on every other path the
        coordinator proposes them all.
        """
        t0 = time.perf_counter()
        self._compute: list[float] = []
        self._receive: list[float] = []
        self._proposed: list[float] = []  # the evaluators' seconds proposing (over the group)
        self._phases: dict[str, float] = {}  # the group exchange's, seen by the trainer
        energies, sync_s, t1 = None, 0.0, t0
        if self.transport == "collective":
            energies = self._judge_in_group(batch[0], version)
        if energies is None:
            candidates = self._candidates()
            t1 = time.perf_counter()
            if self.transport == "collective":  # not possible, or a rank failed: sync first
                t = time.perf_counter()
                self._sync(version)
                sync_s = time.perf_counter() - t
            energies = self._evaluate(candidates, batch[0], weights, version)
        t3 = time.perf_counter()
        record = self.search.select(energies)
        self._propose_ahead()
        self.timings.append(
            {"propose_s": t1 - t0, "sync_s": sync_s, "evaluate_s": t3 - t1 - sync_s,
             "compute_s": self._compute, "receive_s": self._receive,
             "proposed_s": self._proposed, **self._phases,
             "select_s": time.perf_counter() - t3}
        )  # fmt: skip
        record["evaluators"] = self.pool.num_healthy()
        return {
            "record": record,
            "best": self.search.population.best,
            "converged_at": self.search.converged_at,
        }

    def population(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current population's (states, energies)."""
        p = self.search.population
        return p.states, p.energies

    # --- the process group
    def _form_group(self, want: list[int]) -> bool:
        """Destroy the old group and form a new one of the trainer and evaluators ``want``."""
        self.epoch += 1
        self.regroups += 1
        t = self.pool.timeout_s
        address = ray.get(self.trainer.group_address.remote(), timeout=t)
        world, e = len(want) + 1, self.epoch
        trainer = self.trainer.join_group.remote(address, 0, world, self.backend, t, e)
        rank = {i: r for r, i in enumerate(want, start=1)}
        failed, error = self.pool.foreach(
            lambda i, ev: ev.join_group.remote(address, rank[i], world, self.backend, t, e),
            want,
            others={trainer: -1},
        )
        ok = not failed and error is None
        if ok:
            self.pool.set_healthy(want)
        self.members = want if ok else None
        self.synced = -1
        return ok

    def _sync(self, version: int) -> None:
        """Every live evaluator holds weights ``version`` when this returns (and serves no
        more: the calls of this path queue behind a serving loop)."""
        self._stop_serving()
        error: Exception | None = None
        for _ in range(2 * len(self.pool) + 2):
            # with every evaluator marked dead, try them all again (as the shards do)
            want = self.pool.healthy()
            if want != self.members:
                if not self._form_group(want):
                    continue
            if self.synced == version:
                return
            trainer = self.trainer.publish.remote(version, self.epoch)
            failed, error = self.pool.foreach(
                lambda i, ev: ev.receive.remote(version, self.epoch), want, others={trainer: -1}
            )
            if not failed and error is None:
                self.synced = version
                self.sync_log.append(ray.get(trainer, timeout=self.pool.timeout_s))
                return
            self.lost_in_sync += len(failed)
            self.members = None  # a broadcast failed: the group is re-formed
        raise RuntimeError(f"no evaluator could receive weights {version}: {error!r}")

    def rejoin(self, version: int, timeout_s: float) -> dict[str, int]:
        """Wait up to ``timeout_s`` for evaluators marked dead to come back, then send them
        weights ``version`` (the trainer's current step): how a restarted evaluator rejoins
        between generations, on demand."""
        deadline = time.monotonic() + timeout_s
        while self.pool.num_healthy() < len(self.pool) and time.monotonic() < deadline:
            self.pool.probe()
            time.sleep(0.2)
        if self.transport == "collective":
            self._sync(version)
        return self.stats()

    def _judge_in_group(self, batch_ref, version: int) -> torch.Tensor | None:
        """The generation proposed and judged over the process group: one call, the
        trainer's, whatever the number of evaluators (they serve in a loop, started once per
        group). The evaluators propose their shards' trials; the search takes them.

        Only in the steady state: the group is formed from the live evaluators and every one
        of them still serves. Returns None otherwise, or when the exchange failed (the
        evaluators that died marked dead, the group to be re-formed); the caller then
        proposes, syncs and judges with one call per evaluator, re-running every shard, so the
        trials and energies are the same.
        """
        want = self.pool.healthy()
        if self.members is None or want != self.members:
            return None
        if self.serving:
            done, _ = ray.wait(list(self.serving.values()), num_returns=1, timeout=0)
            if done:  # one stopped serving (died, or its group broke): re-form first
                self._stop_serving()
                self.members = None
                return None
        else:
            proposer = self.search.proposer
            self.serving = {i: self.pool.actors[i].serve.remote(self.epoch, proposer)
                            for i in want}  # fmt: skip
        rows = pack_rows(self.search.population.states)
        # the batch's reference, unresolved: the trainer drew it and still has it
        ref = self.trainer.judge.remote(
            version, self.epoch, rows, self.search.generation, [batch_ref]
        )
        try:
            out = ray.get(ref, timeout=self.pool.timeout_s + 30)
        except RayActorError as e:
            raise InputsLost(f"the trainer is gone: {e}") from e
        except (RayTaskError, GetTimeoutError, ObjectLostError):
            self._stop_serving()
            self.members = None  # the exchange failed: the group is re-formed
            return None
        self.synced = version
        self.grouped += 1
        if out["sync"] is not None:
            self.sync_log.append(out["sync"])
        self._compute, self._receive = out["compute_s"], out["receive_s"]
        self._proposed, self._phases = out["propose_s"], out["phases"]
        self.search.take_trials(unpack_rows(out["trials"], self.search.num_units))
        return out["energies"]

    def _stop_serving(self) -> None:
        """End the evaluators' serving loops: the ones still waiting are told to stop (over
        the group, by the trainer); one that died or does not end in time is marked dead."""
        if not self.serving:
            return
        serving, self.serving = self.serving, {}
        t = self.pool.timeout_s
        done, _ = ray.wait(list(serving.values()), num_returns=len(serving), timeout=0)
        waiting = [self.members.index(i) + 1 for i, r in serving.items()
                   if r not in done and self.members and i in self.members]  # fmt: skip
        if waiting:
            try:
                ray.get(self.trainer.stop_serving.remote(self.epoch, waiting), timeout=t)
            except RayActorError as e:
                raise InputsLost(f"the trainer is gone: {e}") from e
            except (RayTaskError, GetTimeoutError):
                pass  # the ones not told end when their group times out, or are marked dead
        ready, _ = ray.wait(list(serving.values()), num_returns=len(serving), timeout=t + 30)
        lost = []
        for i, ref in serving.items():
            try:
                if ref not in ready:
                    raise TimeoutError(f"evaluator {i} did not stop serving")
                ray.get(ref, timeout=t)
            except (RayActorError, RayTaskError, GetTimeoutError, TimeoutError):
                lost.append(i)
        self.pool.set_healthy(lost, False)
        self.lost_in_sync += len(lost)

    def _evaluate(self, candidates, batch_ref, weights, version) -> torch.Tensor:
        # never more shards than candidates: an evaluator with nothing to judge is left idle
        n = min(len(self.pool.healthy()), candidates.shape[0])
        shards = [pack_states(s) for s in torch.tensor_split(candidates, n)]
        results = self.pool.map(
            lambda ev, k: ev.evaluate.remote(k, shards[k], batch_ref, weights, version), n
        )
        return self._energies(results)

    def _energies(self, results: list) -> torch.Tensor:
        """The energies of ``results`` (evaluate's answers, in shard order), concatenated; the
        seconds each shard computed and received weights, kept for the timing log."""
        self._compute = [r[2] for r in results]
        self._receive = [r[3] for r in results]
        return torch.cat([r[1] for r in results])

    def timing_log(self) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
        """Per generation: seconds in propose, in a separate weight sync (0 when the weights
        went out in the judging round), evaluate (wall, that round included), each shard's
        compute and weight receive, select; and the trainer's side of each broadcast (bytes,
        pack, broadcast)."""
        return [dict(t) for t in self.timings], [dict(t) for t in self.sync_log]

    def live_evaluators(self) -> int:
        return self.pool.num_healthy()

    def stats(self) -> dict[str, Any]:
        return {
            "live": self.pool.num_healthy(),
            "reruns": self.pool.reruns,
            "lost_in_sync": self.lost_in_sync,
            "regroups": self.regroups,
            "grouped": self.grouped,
            "members": list(self.members or []),
        }

    # --- proposing ahead (the class docstring)
    def _propose_ahead(self) -> None:
        # not when the search is frozen (no generation follows), nor over the process group,
        # where the evaluators propose (a generation that falls back proposes then)
        if not self.search.frozen and self.transport != "collective":
            self._ahead = self._proposer.submit(self.search.propose)

    def _candidates(self) -> torch.Tensor:
        """This generation's candidates: the ones proposed ahead, else proposed now."""
        if self._ahead is None:
            return self.search.propose()
        future, self._ahead = self._ahead, None
        return future.result()

    def state_dict(self) -> dict[str, Any]:
        """The search's state; a proposal under way is not in it (it draws from no state the
        search keeps, so a resumed run proposes the same again)."""
        return self.search.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self._ahead is not None:  # proposed from the state being replaced: dropped
            wait([self._ahead])
            self._ahead = None
        self.search.load_state_dict(sd)
