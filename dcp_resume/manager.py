"""CheckpointManager: the engine's API (README.md, "Using the engine") on top of sharded DCP checkpoints with a
rank-0 commit."""
from __future__ import annotations

import copy
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import accelerate_loaders
from . import artifacts as artifacts_mod
from . import (
    commit,
    dcp_io,
    incremental,
    integrity,
    layout,
    link_source,
    live_state,
    per_rank,
    resume_check,
    run_start,
    savedir_lock,
)
from .distributed import CommitGroup, rank, world_size
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CorruptCheckpointError,
)
from .gc_pause import gc_paused
from .logs import configure as configure_logging
from .logs import logger
from .options import CheckpointOptions, as_dict
from .preemption import PreemptionHandler, agree
from .resume_check import LoadStats
from .retention import plan_removals
from .staging import StagingBuffers
from .storage import Storage, open_storage


def _log_failure(future, step: int) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("Background save of step %s failed: %s", step, future.exception())


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "another rank"


class CheckpointManager:
    """Saves and restores training state under save_dir (the format and the protocol: docs/FORMAT.md).

    Every call that saves or loads is collective: call it on every rank. With
    `enable_preemption_handling`, SIGTERM/SIGUSR1/SIGINT (or `preemption_signals`) only set a flag;
    `should_save(step)` (then collective too: call it every step on every rank) agrees on it across
    ranks and returns True, with `self.preempted` set: save with kind="preemption" and exit with
    PREEMPTED_EXIT_CODE (143). The handlers are installed by the first start_run(), should_save() or
    save_checkpoint() (or install_preemption_handlers()), and restored by `close()`.

    Building a manager has no side effects: no handler, no log level, no I/O. A read-only caller
    (find_latest_checkpoint, load_checkpoint) changes nothing but the log level `verbose` asks for.

    save_dir may be a URL (s3://bucket/run, gs://..., memory://...): it goes through fsspec with the same
    commit protocol; `storage_options` (endpoint, credentials, ...) are passed to fsspec for it. The bucket is
    checked at the first call that touches it.
    """

    def __init__(self, save_dir: str | os.PathLike, save_interval: int = 100, keep_last_n: int | None = 3,
                 enable_preemption_handling: bool = True, verbose: bool = True, *,
                 options: CheckpointOptions | None = None, **keywords: Any):
        """The established keywords (and every other field of CheckpointOptions: config, keep_best,
        collective_timeout_s, preemption_signals, async_save, on_commit, low_disk_policy, storage_options,
        lock_wait_s, lock_lease_s, incremental), or `options` made elsewhere."""
        if save_dir is None or str(save_dir) == "":
            raise ValueError("save_dir is empty; pass the directory that holds (or will hold) checkpoints")
        if options is None:
            options = CheckpointOptions(save_interval=save_interval, keep_last_n=keep_last_n,
                                        enable_preemption_handling=enable_preemption_handling, verbose=verbose,
                                        **keywords)
        elif keywords:
            raise TypeError(f"pass either options= or keywords, not both (got {', '.join(sorted(keywords))})")
        self.options = o = options
        self.save_dir = os.fspath(save_dir)
        self.storage: Storage = open_storage(self.save_dir, o.storage_options)
        self._reachable = False  # the store answered once (a missing bucket: one StorageError, at first use)
        self.save_interval, self.keep_last_n, self.keep_best = o.save_interval, o.keep_last_n, o.keep_best
        self.config = o.config
        self.low_disk_policy, self.async_save, self.on_commit = o.low_disk_policy, o.async_save, o.on_commit
        self.lock_wait_s = o.lock_wait_s
        self.history: list[dict[str, Any]] = []  # training_stats.json when the caller passes none
        self.loaded_metadata: dict[str, Any] | None = None
        self.loaded_path: str | None = None  # the checkpoint the last load_checkpoint loaded
        self.load_stats: LoadStats | None = None  # where the last load_checkpoint's time went, on this rank
        self._discovered: tuple[str, str] | None = None  # (path, its save_dir) find_latest_checkpoint returned
        self.loaded_training_stats: Any = None  # training_stats.json of the loaded checkpoint (None: unreadable)
        self.last_blocking_s: float | None = None  # how long the last save_checkpoint call blocked
        self._group = CommitGroup(o.collective_timeout_s)
        self._background_group = CommitGroup(o.collective_timeout_s)  # async saves' own collectives
        self._staging = StagingBuffers()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dcp-resume-save") if o.async_save else None
        self._in_flight: tuple[int, str, Any] | None = None
        self._cleaned_at_start = False
        self._lock: savedir_lock.SaveDirLock | None = None  # one writer per save_dir: start_run or first save
        self._last_bytes: int | None = None  # size of this manager's last commit: the next one's space estimate
        self.preempted = False
        self._warned_loaders = False  # accelerate loaders without resumable order: warned once
        self._preemption = PreemptionHandler(o.preemption_signals) if o.enable_preemption_handling else None
        self._logging_set = False

    # -- the public API ---------------------------------------------------------------------------
    def should_save(self, step: int, force: bool = False) -> bool:
        """The one place that decides whether a save happens at `step`: forced, periodic, or because a
        preemption signal reached any rank (then `self.preempted` is True on every rank)."""
        self.install_preemption_handlers()
        if self._preemption is not None and not self.preempted:
            with self._failures_named(f"preemption agreement at step {step}"):
                self.preempted = agree(self._preemption.requested, self._group.group)
            if self.preempted:
                logger.warning("Preemption signal received (%s): saving a preemption checkpoint at step %s",
                               _signal_name(self._preemption.received), step)
        if force or self.preempted:
            return True
        return bool(self.save_interval) and step > 0 and step % self.save_interval == 0

    def start_run(self, resume_from: str | os.PathLike | None = None) -> None:
        """Claim save_dir for this run before training (collective; optional, but it turns late failures into
        early ones): check that save_dir is a writable directory, take its lock (waiting up to lock_wait_s for
        a live holder), and refuse (CheckpointExistsError) when save_dir holds a checkpoint at a higher step
        than `resume_from` (the checkpoint this run resumes; None: a fresh run from step 0). Raises
        StorageError or SaveDirLockedError otherwise, the same on every rank, before anything is written."""
        self._set_logging()
        self.install_preemption_handlers()
        start = None if resume_from is None else os.fspath(resume_from)

        def claim() -> None:
            self._check_reachable()
            step = 0 if start is None else layout.inspect_dir(open_storage(start), start).step
            run_start.check_no_newer(self.storage, self.save_dir, start, step)  # first: a refused run leaves
            self._take_lock()                                                  # no trace, not even a lock
        self._group.run_on_rank0(claim)

    def install_preemption_handlers(self) -> None:
        """Install the flag-setting signal handlers now (idempotent; nothing without
        enable_preemption_handling). start_run(), should_save() and save_checkpoint() call it."""
        if self._preemption is not None and not self._preemption.installed:
            self._preemption.install()

    def find_latest_checkpoint(self, checkpoint_dir: str | os.PathLike | None = None) -> str | None:
        """Path of the complete checkpoint with the highest step (ties: newest timestamp) whose state/ matches
        DCP's index, or None. Cheap on every rank: it reads metadata.json and DCP's index, not the shards.
        Contents are verified as they load: load_checkpoint() of the path returned here falls back to the
        previous checkpoint, with a warning naming the file, if the bytes do not match (`loaded_path` says
        which one loaded). Damaged ones passed over get the same warning."""
        where = os.fspath(checkpoint_dir or self.save_dir)
        store = self.storage if where == self.save_dir else open_storage(where)
        if store is self.storage:
            self._check_reachable()
        with gc_paused():
            info = integrity.latest_candidate(store, where)
        self._discovered = (info.path, where) if info else None
        return info.path if info else None

    def save_checkpoint(self, state: dict[str, Any], step: int, epoch: int = 0, is_best: bool = False,
                        extra_artifacts: dict[str, Any] | None = None, *, kind: str = "step",
                        metrics: dict[str, Any] | None = None, best_metric: Any = None,
                        config: Any = None, training_stats: Any = None) -> str | None:
        """Write `state` as checkpoint `step_<step>/` (`epoch<epoch>/` for kind='epoch') and commit it.

        Sync: returns the path once metadata.json is durable. Async (`async_save=True`): returns the path
        the checkpoint will have as soon as `state` is copied into the staging buffers; writing and the
        commit go on in the background (`on_commit` runs when it lands). At most one save is in flight:
        this call first waits for the previous one and raises its error, if any. Collective: every rank
        calls it with the same step, kind and artifact names. Returns None, having written nothing, when a
        periodic save is skipped for lack of disk space (`low_disk_policy="skip"`).
        """
        t0 = time.perf_counter()
        artifacts_mod.check(extra_artifacts)
        self._set_logging()
        self.install_preemption_handlers()
        self.wait()
        path = os.path.join(self.save_dir, layout.checkpoint_name(kind, step, epoch))
        with self._failures_named(f"save of step {step} to {path}"):
            action = self._group.run_on_rank0(lambda: self._prepare_target(path, kind))
            if action == commit.SKIP:
                return None
            self._warn_unresumable_loaders(state)
            if training_stats is None:
                self.history.append({"step": int(step), "epoch": int(epoch), "kind": kind, **(metrics or {})})
                training_stats = {"history": self.history}
            commit_args = copy.deepcopy(dict(step=step, epoch=epoch, kind=kind, is_best=is_best, metrics=metrics,
                                             best_metric=best_metric, config=as_dict(config) or self.config,
                                             training_stats=training_stats))
            extras = artifacts_mod.gather_full_tensors(extra_artifacts)
            if action == commit.RELABEL:
                self._group.run_on_rank0(lambda: self._relabel_as_final(path, extras, commit_args))
                self.last_blocking_s = time.perf_counter() - t0
                return path
            payload = live_state.to_save(state, self._group, rank(), world_size())
            reuse = self._plan_reuse(payload, path)
            payload = incremental.without(payload, reuse.keys)  # staged and written: only what changed
            commit_args["fingerprints"] = reuse.fingerprints
        if not self.async_save:
            self._write_and_commit(payload, extras, path, commit_args, self._group, t0, reuse)
            self.last_blocking_s = time.perf_counter() - t0
            return path
        staged = self._staging.stage(payload)
        group = self._background_group
        group.group  # noqa: B018  (created here, in the main thread, in the same order on every rank)
        future = self._executor.submit(self._write_and_commit, staged, extras, path, commit_args, group, t0, reuse)
        future.add_done_callback(lambda f: _log_failure(f, step))  # said when it happens; raised by wait()
        self._in_flight = (step, path, future)
        self.last_blocking_s = time.perf_counter() - t0
        return path

    def load_checkpoint(self, checkpoint_path: str | os.PathLike | None = None, map_location: Any = "cpu",
                        state: dict[str, Any] | None = None, *, per_rank_policy: str = "refuse") -> dict[str, Any]:
        """Load a checkpoint (default: the latest complete one in save_dir).

        Every byte used is verified against metadata.json's hashes, the work spread over the ranks (each checks
        what it reads, as it reads it). When the checkpoint was not named (or is the path find_latest_checkpoint
        returned) and fails, every rank falls back to the previous one together, with a warning naming the
        file; a named checkpoint that fails raises CorruptCheckpointError. `loaded_path` is the one loaded,
        `load_stats` where the time went.

        With `state`, restores its live objects (models, optimizers, schedulers, anything with
        load_state_dict) in place and returns the loaded dict for the keys of `state`; state that differed
        per rank when saved comes back to the rank that saved it. Without `state`, returns everything the
        checkpoint holds. Metadata of the loaded checkpoint is kept in `self.loaded_metadata`. Collective
        when running distributed.

        After a world-size change, per-rank state has no owner. A data loader driven by a ResumableSampler
        reshards and an RNGState keeps this process's seeding; for anything else `per_rank_policy="refuse"`
        raises CheckpointMismatchError naming it, before anything is read, and "fresh" leaves those objects
        as constructed and out of the returned dict. Both are logged.
        """
        per_rank.validate_policy(per_rank_policy)
        self._set_logging()
        self.wait()
        try:
            with gc_paused():
                return self._load_checkpoint(checkpoint_path, map_location, state, per_rank_policy)
        finally:
            dcp_io.forget_shared_index()

    def _load_checkpoint(self, checkpoint_path: str | os.PathLike | None, map_location: Any,
                         state: dict[str, Any] | None, per_rank_policy: str) -> dict[str, Any]:
        self.load_stats = stats = LoadStats()
        t0 = time.perf_counter()
        path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        where = self.save_dir if path is None else self._discovered[1] if self._is_discovered(path) else None
        info = self._group.run_on_rank0(lambda: self._first_candidate(path, where))
        stats.discovery_s = time.perf_counter() - t0
        while True:
            try:
                loaded = self._load_verified(info, state, map_location, per_rank_policy, stats)
                break
            except CorruptCheckpointError as e:
                integrity.remember(self._store_of(info.path), info, getattr(e, "detail", str(e)))
                if where is None:  # an explicit path: no fallback
                    raise
                if rank() == 0:
                    logger.warning("Skipping checkpoint %s: %s", info.path, getattr(e, "detail", e))
                stats.skipped.append(info.path)
                t1, below = time.perf_counter(), info.order
                info = self._group.run_on_rank0(
                    lambda: integrity.latest_candidate(self._store_of(where), where, below=below))
                stats.discovery_s += time.perf_counter() - t1
                if info is None:
                    text = self._group.run_on_rank0(lambda: integrity.none_loads(self._store_of(where), where))
                    raise CheckpointNotFoundError(text or f"No checkpoint found to resume in {where}: every "
                                                  f"complete checkpoint fails verification (the last: {e})") from None
        stats.path, stats.checkpoint_bytes = info.path, layout.listed_bytes(info.meta.get("files"))
        self.loaded_metadata = info.meta
        self.loaded_path = info.path
        self._restore_history(self._store_of(info.path), info.path)
        logger.info("Loaded checkpoint: %s (step %s, epoch %s)", info.path,
                    self.loaded_metadata.get("step"), self.loaded_metadata.get("epoch"))
        return loaded

    def _load_verified(self, info: layout.CheckpointInfo, state: dict[str, Any] | None, map_location: Any,
                       per_rank_policy: str, stats: LoadStats) -> dict[str, Any]:
        """Collective: verify and load one checkpoint (resume_check.py); CorruptCheckpointError on every rank
        when any rank finds a byte that does not match."""
        store = self._store_of(info.path)
        state_dir = os.path.join(info.path, layout.STATE_DIR)
        saved_world = info.meta.get("world_size")

        def prepare(expected):
            meta = dcp_io.read_metadata(store, state_dir, expected, shared=True)  # parsed once if discovered
            if state is None:
                return dcp_io.template_from_metadata(meta, None, map_location), None, None
            live = live_state.split(state)
            loaded, rank_plan = live_state.build_template(
                live, meta, map_location, saved_world=saved_world if isinstance(saved_world, int) else -1,
                rank=rank(), world=world_size(), per_rank_policy=per_rank_policy)
            return loaded, live, rank_plan
        expected, prepared, refusal = resume_check.share_and_prepare(
            store, info, rank(), world_size(), stats, prepare)
        loaded, live, rank_plan = prepared or ({}, None, None)
        t0 = time.perf_counter()
        try:
            dcp_io.load(store, loaded, state_dir, self._group.group, expected, refusal)
        except CorruptCheckpointError as e:  # a rank found an item that does not match: every rank is here
            raise integrity.corrupt(info.path, "hash", getattr(e, "detail", str(e))) from None
        finally:
            stats.load_s += time.perf_counter() - t0
            stats.hashed_bytes += expected.hashed_bytes
        if live is not None:
            live_state.restore(live, loaded, rank_plan)
            self._report_resharding(info.meta, rank_plan)
        return loaded

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error, naming the step."""
        in_flight = self._in_flight
        if in_flight is None:
            return
        step, path, future = in_flight
        try:
            future.result()  # every concurrent waiter blocks here until the commit (or failure) lands
        except CheckpointSaveError:
            raise
        except Exception as e:  # surfaced here, where the caller can act on it
            raise CheckpointSaveError(f"background save of step {step} to {path} failed: {type(e).__name__}: "
                                      f"{e}. The previous checkpoint stays the latest") from e
        finally:
            if self._in_flight is in_flight:
                self._in_flight = None

    def close(self) -> None:
        """Wait for the save in flight (raising its error), then release threads, groups and handlers."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            # After a preemption the process is on its way out with 143: keep the flag handlers, so a
            # launcher's follow-up SIGTERM (torchrun terminates the other workers) cannot make it a kill.
            if self._preemption is not None and not self.preempted:
                self._preemption.restore()
            self._background_group.close()
            self._group.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _write_and_commit(self, payload: dict, extras: dict, path: str, commit_args: dict, group: CommitGroup,
                          t0: float, reuse: incremental.Reuse) -> None:
        """The protocol's write and commit (commit.py), then retention and the log line on rank 0."""
        size = commit.write_and_commit(self.storage, payload, extras, path, commit_args, group, self.save_dir,
                                       reuse)
        self._last_bytes = size
        if rank() == 0:
            self._apply_retention(protect=path)
            logger.info("Saved checkpoint: %s (%.1f MB, %.2f s)", path, size / 1e6, time.perf_counter() - t0)
            if self.on_commit is not None:
                self.on_commit(path)

    def _plan_reuse(self, payload: dict, path: str) -> incremental.Reuse:
        """Collective: the tensors this save links from an earlier checkpoint (link_source.py says which)."""
        if not self.options.incremental:
            return incremental.Reuse()
        source = link_source.choose(self.storage, self.save_dir, path, self.keep_last_n) if rank() == 0 else None
        return incremental.plan(incremental.reusable(payload), source, self._group)

    def _failures_named(self, what: str):
        return commit.failures_named(what, self.storage, self.save_dir, self._group.timeout_s)

    def _prepare_target(self, path: str, kind: str) -> str:
        """Rank 0, before a save: the lock, then commit.prepare. Once, before this manager's first write: a
        manager that did not resume refuses to start over in a save_dir whose checkpoints are all damaged
        (integrity.none_loads), and interrupted saves are cleaned."""
        if not self._cleaned_at_start and self.loaded_path is None:  # start_run refused this already, if called
            refusal = integrity.none_loads(self.storage, self.save_dir)
            if refusal is not None:  # never start over beside damaged checkpoints: read only, not even the lock
                raise CheckpointExistsError(refusal)
        self._take_lock()

        def clean_leftovers() -> None:
            if not self._cleaned_at_start:
                self._apply_retention(complete_too=False)
                self._cleaned_at_start = True
        return commit.prepare(self.storage, path, kind, save_dir=self.save_dir, last_bytes=self._last_bytes,
                              low_disk_policy=self.low_disk_policy, resumed=self.loaded_path is not None,
                              before_first_write=clean_leftovers)

    def _relabel_as_final(self, path: str, extras: dict, commit_args: dict) -> None:
        commit.relabel_as_final(self.storage, path, extras, commit_args, self.save_dir)
        if self.on_commit is not None:
            self.on_commit(path)

    def _take_lock(self) -> None:
        """Rank 0: this manager's share of the save_dir lock, once save_dir is known to be writable."""
        if self._lock is None:
            self.storage.check_writable(self.save_dir)
            self._reachable = True
            self._lock = savedir_lock.acquire(self.storage, self.save_dir, owner=self, wait_s=self.lock_wait_s,
                                              lease_s=self.options.lock_lease_s)

    def _check_reachable(self) -> None:
        """Once: a missing bucket or a dead endpoint is one StorageError naming the URL, not a listing error."""
        if not self._reachable:
            self.storage.check_reachable(self.save_dir)
            self._reachable = True

    def _set_logging(self) -> None:
        """Once, at the first call that saves or loads: the `dcp_resume` log level that `verbose` asks for."""
        if not self._logging_set:
            configure_logging(self.options.verbose)
            self._logging_set = True

    def _store_of(self, path: str) -> Storage:
        """save_dir's store for paths in it, else the store of that path (a checkpoint named elsewhere)."""
        return self.storage if path == self.save_dir or path.startswith(self.save_dir.rstrip("/") + "/") \
            else open_storage(path)

    def _apply_retention(self, complete_too: bool = True, protect: str | None = None) -> None:
        infos = layout.list_checkpoints(self.storage, self.save_dir)
        for info in plan_removals(infos, self.keep_last_n if complete_too else None, self.keep_best, protect):
            why = "retention" if info.complete else f"{'damaged' if info.committed else 'incomplete'}: {info.reason}"
            logger.info("Removing checkpoint %s (%s)", info.path, why)
            self.storage.remove_tree(info.path)

    def _is_discovered(self, path: str) -> bool:
        return self._discovered is not None and path == self._discovered[0]

    def _first_candidate(self, path: str | None, where: str | None) -> layout.CheckpointInfo:
        """Rank 0: the checkpoint a load tries first, with the messages users know (CheckpointNotFoundError,
        IncompleteCheckpointError): the newest candidate in save_dir, or `path` (contents not read yet)."""
        if path is None:
            self._check_reachable()
            info = integrity.latest_candidate(self.storage, self.save_dir)
            if info is None:
                raise CheckpointNotFoundError(
                    f"No checkpoint found to resume in {self.save_dir}: looked for complete step_*/epoch* "
                    "directories (ones with a valid metadata.json)")
            return info
        return resume_check.named_checkpoint(self._store_of(path), path, check_index=where is None)

    def _warn_unresumable_loaders(self, state: dict[str, Any]) -> None:
        """Once per manager: an accelerate-prepared loader (in state, or being iterated) whose shuffle order
        no checkpoint restores gets a warning naming what to set."""
        if self._warned_loaders:
            return
        for obj in [None, *state.values()]:  # None: the loaders accelerate is iterating now
            problem = accelerate_loaders.unresumable_loader_problem(obj)
            if problem is not None:
                self._warned_loaders = True
                if rank() == 0:
                    logger.warning("INEXACT RESUME: %s", problem)
                return

    @staticmethod
    def _report_resharding(committed: dict[str, Any], rank_plan: per_rank.Plan) -> None:
        if rank() != 0 or not (rank_plan.resharded or rank_plan.fresh):
            return
        change = f"world size {committed.get('world_size')} -> {world_size()}"
        if rank_plan.resharded:
            logger.warning("%s: data loaders %s continue from the saved global sampler position (their workers "
                           "start afresh)", change, ", ".join(rank_plan.resharded))
        if rank_plan.fresh:
            logger.warning("%s: per-rank state %s has no owner here and was left as constructed (RNG streams keep "
                           "this process's seeding)", change, ", ".join(rank_plan.fresh))

    def _restore_history(self, store: Storage, path: str) -> None:
        """training_stats.json of the loaded checkpoint, as `loaded_training_stats` (None when unreadable)."""
        try:
            stats = store.read_json(os.path.join(path, layout.STATS_FILE))
        except (OSError, ValueError):
            stats = None
        self.loaded_training_stats = stats
        if isinstance(stats, dict) and isinstance(stats.get("history"), list):
            self.history = list(stats["history"])
