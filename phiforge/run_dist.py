"""`phiforge run` under torchrun: one recipe, N processes (one or many nodes), every stage run where it belongs.

    torchrun --nproc_per_node 8 -m phiforge run --config configs/recipes/phi-1.yaml
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m phiforge run --config configs/recipes/phi-1.yaml            # the run directory on a shared filesystem

- **Data stages** (corpus, curate, synthesis, tokenization) and **evaluation and the report** run once, on rank 0
  (curation spreads itself over a Ray cluster with `curate: executor: ray`). The other ranks wait until rank 0
  has finished every stage before the next training stage, up to `dist: wait_timeout` seconds, and say so in
  their log.
- **Training stages** (Stage.every_rank: train, finetune, the ablation's train-raw) run on every rank: DDP, or
  FSDP2 with `fsdp: true`, in the run's one process group (opened here at the start, found by `train()`). A train
  section's batch is the *global* batch: micro_batch x grad_accum sequences per optimizer step however many
  processes share it (`share_batch`), so the same config trains the same model on 1 or N processes.
- **Stage reuse** is decided by rank 0 from the stage hashes (`.stage.json`), as in one process, and sent to the
  others; a restarted job reuses what is finished.
- **A failure anywhere ends the whole run**: the failing rank publishes the stage and the message in the job's
  store; every other rank's watchdog sees it within a second or two and exits with a message naming the stage
  and the rank (a rank blocked in a collective or waiting on rank 0 never hangs), and a wait that runs out is a
  failure of its own.
- **Logs**: rank 0 prints, as one process does; every rank writes its whole output to RUN/logs/rank-K.log.

The ranks talk through the c10d TCP store that torchrun (or the process group's rendezvous) already runs at
MASTER_ADDR:MASTER_PORT, under a prefix of this launch's restart count, so an elastic restart starts clean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from phiforge.errors import ConfigError, PhiforgeError

if TYPE_CHECKING:
    from phiforge.run import Runner, Stage
    from phiforge.train.config import TrainConfig

FAULT_ENV = "PHIFORGE_TEST_FAULT"  # tests only: "STAGE:RANK:STEP" makes RANK fail at STEP of STAGE
WATCH_INTERVAL = 1.0  # seconds between a watchdog's looks at the store
WATCH_GRACE = 3.0  # seconds a rank's own code gets to stop by itself once another rank has failed
_running: dict[str, Any] = {"stage": None, "every_rank": True}  # the stage this process is executing (run_stages)


@dataclass
class DistConfig:
    """How the ranks of a torchrun job wait for each other (ignored in a single process)."""

    wait_timeout: float = 86400.0  # seconds a rank waits for rank 0's stages before the next training stage
    poll: float = 0.5  # seconds between a waiting rank's looks at the store

    def __post_init__(self) -> None:
        if not self.wait_timeout > 0 or not self.poll > 0:
            raise ConfigError(f"wait_timeout and poll must be > 0, got {self.wait_timeout}, {self.poll}")


def world() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun describes it; (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world()[1] > 1


def share_batch(cfg: TrainConfig, world_size: int | None = None) -> TrainConfig:
    """The config one of `world_size` processes trains with so that the job's global batch stays the config's
    micro_batch x grad_accum sequences: grad_accum / N micro-steps each (micro_batch, the per-device memory knob,
    unchanged; eval_batches / N, so validation sees the same sequences) when N divides grad_accum, else
    micro_batch / N sequences per micro-step. Data order and losses then match one process (train/data.py)."""
    n = world()[1] if world_size is None else world_size
    if n <= 1:
        return cfg
    if cfg.grad_accum % n == 0:
        return dataclasses.replace(cfg, grad_accum=cfg.grad_accum // n,
                                   eval_batches=-(-cfg.eval_batches // n) if cfg.eval_batches else 0)
    if cfg.micro_batch % n == 0:
        return dataclasses.replace(cfg, micro_batch=cfg.micro_batch // n)
    raise ConfigError(f"the global batch micro_batch {cfg.micro_batch} x grad_accum {cfg.grad_accum} "
                      f"cannot be shared by {n} processes (neither is divisible by {n}); pick values whose "
                      f"grad_accum or micro_batch is a multiple of the process count")


def step_hook(stage: str) -> Callable[[dict[str, Any]], None] | None:
    """What `train()` calls after each optimizer step in a run: a progress line in the rank's log on ranks > 0
    (rank 0 has the progress bar), and the test-only fault of PHIFORGE_TEST_FAULT."""
    rank, n = world()
    if n > 1 and not _running["every_rank"]:  # training on rank 0 alone would wait forever for the others
        raise PhiforgeError(f"stage '{_running['stage']}' trains, but plan() runs it on rank 0 alone; mark its Stage "
                            f"every_rank=True so that every rank of the torchrun job trains")
    fault = os.environ.get(FAULT_ENV, "")
    at_step = None
    if fault:
        f_stage, f_rank, f_step = (fault.split(":") + ["", "", ""])[:3]
        if f_stage == stage and f_rank == str(rank):
            at_step = int(f_step or 1)
    if n <= 1 and at_step is None:
        return None
    last = [0.0]

    def hook(rec: dict[str, Any]) -> None:
        if at_step is not None and rec["step"] >= at_step:
            raise PhiforgeError(f"injected fault at step {rec['step']} ({FAULT_ENV}, used by tests)")
        if rank > 0 and time.monotonic() - last[0] >= 10.0:
            last[0] = time.monotonic()
            print(f"{time.strftime('%H:%M:%S')} {stage}: step {rec['step']} loss {rec['loss']:.4f}", flush=True)

    return hook


# ---------------------------------------------------------------------------------------------- the job


class RankFailed(PhiforgeError):
    """Another rank failed (or a wait ran out): this one stops too."""


class Job:
    """This process's place in the torchrun job: the run's process group and the store the ranks share."""

    def __init__(self, cfg: DistConfig, device: str, console: IO[str], log_file: IO[str], logs: str) -> None:
        from datetime import timedelta

        import torch.distributed as td

        from phiforge.train.parallel import init_distributed

        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
        if missing:
            raise PhiforgeError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {', '.join(missing)} is not set: "
                                f"launch a multi-process run with torchrun (torchrun --nproc_per_node N -m phiforge "
                                f"run ...)")
        self.cfg = cfg
        self.logs = logs
        self.console = console  # the terminal (stderr), even where this rank's output goes to its log
        self.log_file = log_file
        self.dist = init_distributed(device)  # the one process group; train() finds it initialised
        self.rank, self.world = self.dist.rank, self.dist.world_size
        prefix = f"phiforge-run/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

        def connect():
            return td.PrefixStore(prefix, td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                      is_master=False, timeout=timedelta(seconds=300)))

        self.store = connect()
        self._failed_here = False
        self.stage = "(start)"  # the stage this rank is in, for a failure outside the stage's own body
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, args=(connect(),), daemon=True,
                                       name="phiforge-rank-watchdog")
        self._watch.start()

    # -- failures -------------------------------------------------------------------------------------------
    def fail(self, stage: str, message: str) -> None:
        """Tell every rank that this one failed in `stage` (the first failure is the one reported)."""
        self._failed_here = True
        rec = json.dumps({"rank": self.rank, "stage": stage, "message": message})
        with contextlib.suppress(Exception):  # the store (torchrun's agent) may be gone; exiting says enough
            self.store.compare_set("failed", "", rec)

    def failure(self, store: Any = None) -> dict[str, Any] | None:
        store = store or self.store
        if not store.check(["failed"]):
            return None
        return json.loads(store.get("failed"))

    def failure_elsewhere(self, within: float) -> dict[str, Any] | None:
        """Another rank's failure, waiting up to `within` seconds for it to be published."""
        end = time.monotonic() + within
        while True:
            try:
                f = self.failure()
            except Exception:  # noqa: BLE001 - no store: nothing to learn
                return None
            if f is not None and f["rank"] != self.rank:
                return f
            if time.monotonic() >= end:
                return None
            time.sleep(0.2)

    def failure_message(self, f: dict[str, Any]) -> str:
        return (f"stage '{f['stage']}' failed on rank {f['rank']} of {self.world}: {f['message']} (rank "
                f"{self.rank} stopped too; each rank's log is in {self.logs}/)")

    def _watchdog(self, store: Any) -> None:
        """Ends this process when another rank has failed and this one did not stop by itself (e.g. it is
        blocked in a collective of the training step, which would otherwise wait for the process group's
        timeout)."""
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                f = self.failure(store)
            except Exception:  # noqa: BLE001 - the store is gone: torchrun's agent ended the job
                f = {"rank": "?", "stage": "?", "message": "the job's store went away (the launcher stopped)"}
            if f is None or self._failed_here or f["rank"] == self.rank:
                continue
            if self._stop.wait(WATCH_GRACE):
                return
            msg = f"phiforge: error: {self.failure_message(f)}"
            for out in (self.console, self.log_file):
                with contextlib.suppress(Exception):
                    print(msg, file=out, flush=True)
            os._exit(2)

    def close(self) -> None:
        self._stop.set()
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()

    # -- waiting --------------------------------------------------------------------------------------------
    def publish(self, key: str, value: Any) -> None:
        self.store.set(key, json.dumps(value, default=str))

    def wait(self, key: str, what: str, stage: str, log: Callable[[str], None]) -> Any:
        """The value rank 0 publishes under `key`; RankFailed when a rank failed or `wait_timeout` runs out."""
        t0 = time.monotonic()
        said = 0.0
        while True:
            if self.store.check([key]):
                return json.loads(self.store.get(key))
            f = self.failure()
            if f is not None:
                raise RankFailed(self.failure_message(f))
            waited = time.monotonic() - t0
            if waited > self.cfg.wait_timeout:
                msg = (f"rank {self.rank} waited {waited:.0f}s for rank 0 to finish {what}, longer than dist: "
                       f"wait_timeout ({self.cfg.wait_timeout:.0f}s); see rank 0's log ({self.logs}/rank-0.log) "
                       f"and raise wait_timeout for longer data stages")
                self.fail(stage, msg)
                raise RankFailed(f"stage '{stage}': {msg}")
            if waited - said >= 60 or not said:
                said = waited or 1e-9
                log(f"rank {self.rank}: waiting for rank 0 to finish {what} ({waited:.0f}s so far, up to "
                    f"{self.cfg.wait_timeout:.0f}s)")
            time.sleep(self.cfg.poll)


# ---------------------------------------------------------------------------------------------- the runner


def run_stages(runner: Runner, stages: list[Stage], job: Job) -> dict[str, dict[str, Any]]:
    """`Runner.run` for one rank of a job: rank 0 runs every stage (reusing as one process does), the others
    only the every-rank stages, each starting once rank 0 has prepared it."""
    last_all = max((i for i, st in enumerate(stages) if st.every_rank), default=-1)
    n = len(stages)
    for i, st in enumerate(stages):
        if job.rank != 0 and i > last_all:
            break  # evaluation and the report: rank 0's
        prefix = f"[{i + 1}/{n}] {st.name}"
        job.stage = st.name
        h = runner.stage_hash(st)
        d = runner.root / st.name
        if job.rank == 0:
            reused = runner.reused(st, h)
            if reused is not None:
                runner.log(f"{prefix}: up to date (reused {d})")
            elif st.every_rank:
                runner.log(f"{prefix}: {st.title or st.name} ... (on {job.world} processes)")
                runner.prepare(d)
            if st.every_rank:  # the others start now, with every summary so far (their stage bodies read them)
                job.publish(f"go/{st.name}", {"reused": reused, "summaries": runner.summaries, "hash": h})
            if reused is not None:
                runner.keep(st, h, reused)
                continue
            if not st.every_rank:
                runner.log(f"{prefix}: {st.title or st.name} ...")
                runner.prepare(d)
        elif st.every_rank:
            before = [s.name for s in stages[:i] if not s.every_rank]
            go = job.wait(f"go/{st.name}", f"the stages before '{st.name}' ({', '.join(before[-3:])})", st.name,
                          runner.log)
            if go["hash"] != h:  # the ranks read different configs: never train on a mix
                msg = f"rank {job.rank}'s config differs from rank 0's (stage hash {h} vs {go['hash']})"
                job.fail(st.name, msg)
                raise PhiforgeError(f"stage '{st.name}': {msg}; launch every rank with the same --config")
            runner.summaries.update({k: v for k, v in go["summaries"].items() if k not in runner.summaries})
            if go["reused"] is not None:
                runner.keep(st, h, go["reused"])
                runner.log(f"{prefix}: up to date (reused {d})")
                continue
            runner.log(f"{prefix}: {st.title or st.name} ... (rank {job.rank} of {job.world})")
        else:
            runner.hashes[st.name] = h  # rank 0's stage; its summary comes with the next go/
            continue
        _running.update(stage=st.name, every_rank=st.every_rank)
        try:
            summary, secs = runner.execute(st, d, where=f" on rank {job.rank} of {job.world}")
        except BaseException as e:
            other = None if isinstance(e, PhiforgeError) else job.failure_elsewhere(WATCH_GRACE)
            if other is not None:  # e.g. gloo's "connection closed by peer": the peer's own failure is the story
                raise RankFailed(job.failure_message(other)) from None
            job.fail(st.name, _cause(e))
            raise
        finally:
            _running.update(stage=None, every_rank=True)
        if job.rank == 0:
            runner.record(st, d, h, summary)
        else:
            runner.keep(st, h, summary)
        runner.log(f"{prefix}: done in {secs:.0f}s")
    return runner.summaries


def _cause(e: BaseException) -> str:
    """The failure's own words, without the runner's "stage 'X' failed on rank K of N: " in front."""
    text = str(e) or type(e).__name__
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("stage '") else text


class _Tee:
    """A text stream that writes to the terminal and to the rank's log."""

    def __init__(self, console: IO[str], log: IO[str]) -> None:
        self._console, self._log = console, log

    def write(self, s: str) -> int:
        self._log.write(s)
        return self._console.write(s)

    def flush(self) -> None:
        self._log.flush()
        self._console.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the terminal's
        return getattr(self._console, name)


def run_ranked(runner: Runner, stages: list[Stage], cfg: DistConfig, device: str) -> dict[str, dict[str, Any]]:
    """Run `stages` as one rank of the torchrun job this process belongs to; logs in RUN_DIR/logs/rank-K.log."""
    rank, _ = world()
    logs = runner.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = open(logs / f"rank-{rank}.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below
    log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} phiforge run: rank {rank}, pid {os.getpid()}, "
                   f"host {os.uname().nodename}\n")
    saved = sys.stdout, sys.stderr
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = None
    if rank == 0:
        console = sys.stderr
        sys.stdout, sys.stderr = _Tee(saved[0], log_file), _Tee(saved[1], log_file)
    else:  # everything this rank and its children print goes to its log only
        saved_fds = os.dup(1), os.dup(2)
        console = os.fdopen(os.dup(2), "w", buffering=1)
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    job = None
    try:
        job = Job(cfg, device, console, log_file, str(logs))
        return run_stages(runner, stages, job)
    except BaseException as e:
        if job is not None and not isinstance(e, RankFailed) and not job._failed_here:
            job.fail(job.stage, str(e) or type(e).__name__)
        # the rank's log gets the error too (the CLI prints it to the terminal once the streams are restored)
        print(f"phiforge: error: {e}", file=log_file, flush=True)
        if not isinstance(e, PhiforgeError):
            traceback.print_exc(file=log_file)
        raise
    finally:
        if job is not None:
            job.close()
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved
        if saved_fds is not None:
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            os.close(saved_fds[0])
            os.close(saved_fds[1])
            console.close()
        log_file.close()
