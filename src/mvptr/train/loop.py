"""The pre-training loop of one stage: resumable, deterministic on CPU, distributed with DDP.

Why: both stages of every method (and the joint schedule) are the same loop over different objective lists
(`mvptr.objectives.step`); the model is the method's (`mvptr.models.build_model`), seen only through the
interface of `mvptr.models.base`. It resumes from the stage's checkpoint directory wherever it was stopped
(SIGKILL, preemption, timeout) and then computes exactly what a straight run computes: the data position
is a function of the step (`batch_indices`), and every random state is checkpointed, as is the whole step
module (model, momentum model, objectives' queues and pointers). bf16 autocast on CUDA,
fp32 on CPU. Rank 0 logs every objective's loss, the learning rate and samples/s to MLflow every `log_every`
steps and, with an ETA, to the job's log.

Outputs in the checkpoint directory (the calling command copies them to the rule's outputs on success):
    state.pt            resumable training state (`mvptr.train.checkpoint`)
    run.json            the MLflow run id, kept from the first start so that a resumed job reuses its run
    mlflow-pending.jsonl  steps logged while the MLflow store was unreachable, until sent (mvptr.train.tracker)
    final.safetensors   the stage's weights, written (atomically) once the last step is done

Use (inside a submitit job, or directly on CPU):
    result = train_stage(cfg, 2, StagePaths(dataset, concepts, vocab, regions, ckpt_dir, init_weights=stage1))
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_model
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mvptr.artifacts import FINAL_WEIGHTS, StagePaths
from mvptr.data.order import batch_indices
from mvptr.models import build_model
from mvptr.models.base import VLModel
from mvptr.models.import_checkpoint import save_weights
from mvptr.objectives import uses_questions
from mvptr.objectives.step import PretrainStep, momentum_options
from mvptr.pairs import PairDataset, PairInputs, collate
from mvptr.questions import QuestionBank
from mvptr.regions.store import RegionStore
from mvptr.seeds import derive_seed
from mvptr.train.checkpoint import load_state, save_state
from mvptr.train.distributed import Env, setup_distributed, teardown_distributed
from mvptr.train.optim import build_optimizer
from mvptr.train.stages import stage_objectives
from mvptr.train.tracker import StageRun

Log = Callable[[str], None]


def initialise(model: VLModel, cfg: Mapping[str, Any], stage: int, init_weights: Path | None, log: Log) -> None:
    """Stage two starts from the stage-one weights; stage one from scratch or a BERT checkpoint."""
    if stage == 2:
        if init_weights is None:
            raise ValueError("stage two needs the stage-one weights (init_weights)")
        load_model(model, str(init_weights))
        return
    init = cfg["pretrain"]["init"]
    if init == "scratch":
        return
    if init == "minilm":
        from mvptr.text import tokenizer_path

        init = str(tokenizer_path("minilm"))
    report = model.load_pretrained_bert(init)
    log(f"initialised from {init}: {len(report['loaded'])} tensors loaded, {len(report['missing'])} kept")


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "objectives": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["objectives"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj: Any, env: Env) -> list[Any]:
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _mean_logs(history: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for h in history for k in h})
    return {k: sum(h[k] for h in history if k in h) / sum(k in h for h in history) for k in keys}


class _PreemptionSignal:
    """Defers submitit's preemption/timeout signal (USR2 unless $SUBMITIT_PREEMPT_SIGNAL) to the end of a step.

    submitit's handler checkpoints the job object and requeues at once, interrupting the step wherever it is: the
    run would resume from its last periodic checkpoint and lose up to `checkpoint_every` steps. Here the signal
    only sets a flag; the loop finishes the step, writes its checkpoint (every rank agrees on the step), then hands
    the signal to the handler it replaced (submitit's requeue), so the requeued job resumes at that very step.
    """

    def __init__(self) -> None:
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        self.signum = getattr(signal, name if name.startswith("SIG") else f"SIG{name}")
        self.frame: Any = None
        self.received = False
        # only the main thread may set handlers (a job run in a thread keeps submitit's as they are)
        self.active = threading.current_thread() is threading.main_thread()
        self.previous = signal.signal(self.signum, self._on_signal) if self.active else None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received, self.frame = True, frame

    def requested(self, env: Env) -> bool:
        """Whether any rank got the signal (a collective when there are several ranks)."""
        if env.world_size == 1:
            return self.received
        flag = torch.tensor([int(self.received)], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def hand_over(self) -> None:
        """Restore the replaced handler and let it act (submitit: requeue and exit)."""
        signal.signal(self.signum, self.previous)
        if callable(self.previous):
            self.previous(self.signum, self.frame)
        else:
            signal.raise_signal(self.signum)

    def restore(self) -> None:
        if self.active:
            signal.signal(self.signum, self.previous)


def train_stage(cfg: Mapping[str, Any], stage: int, paths: StagePaths, *, log: Log = print,
                stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) `stage` to `pretrain.stage{stage}.steps`; returns the stage's metrics (rank 0).

    `stop_after` ends the run early after that many steps of this call (tests of resumption).
    """
    env = setup_distributed()
    pcfg, scfg = cfg["pretrain"], cfg["pretrain"][f"stage{stage}"]
    ckpt_dir = Path(paths.ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    inputs = PairInputs.from_artifacts(cfg, paths.dataset, paths.concepts, paths.vocab)
    objectives = stage_objectives(cfg, stage)
    model = build_model(cfg, inputs.vocab_size, RegionStore(Path(paths.regions) / "train.h5").feature_dim)
    questions = None
    if uses_questions(objectives):
        questions = QuestionBank.from_dataset(paths.dataset, inputs.tokenizer, inputs.splits,
                                              model.config.qa_answers, pcfg["max_words"])
        log(f"stage {stage}: QA on {questions.counts['questions']} VQA training questions of "
            f"{questions.counts['images']} pre-training images, {questions.counts['answers']} answers "
            f"({questions.counts['dropped_held_out']} questions of validation or test images left out)")
    pairs = PairDataset(inputs, Path(paths.regions) / "train.h5", "train", questions)
    initialise(model, cfg, stage, paths.init_weights, log)
    model.to(env.device)
    total_steps = scfg["steps"] if objectives else 0
    started = time.monotonic()
    result: dict[str, Any] = {"stage": stage, "method": cfg["method"]["name"], "objectives": objectives,
                              "steps": total_steps, "world_size": env.world_size, "train_pairs": len(pairs),
                              "history": []}
    if questions is not None:
        result["questions"] = questions.counts
    if total_steps == 0:
        log(f"stage {stage}: no objective to train (schedule {pcfg['schedule']}); saving the initialised model")
    else:
        result.update(_train(cfg, stage, model, objectives, pairs, env, ckpt_dir, log, stop_after))
    result["seconds"] = round(time.monotonic() - started, 1)
    if env.is_main and result.get("completed", total_steps == 0):
        save_weights(model, ckpt_dir / FINAL_WEIGHTS)
    teardown_distributed()
    return result


def distribute(step_module: PretrainStep, env: Env) -> torch.nn.Module:
    """The step module, wrapped in DistributedDataParallel when there are several ranks."""
    if env.world_size == 1:
        return step_module
    # Stage one (MCR) leaves the text and cross-modal stacks unused.
    return DistributedDataParallel(step_module, find_unused_parameters=True)


def _train(cfg: Mapping[str, Any], stage: int, model: VLModel, objectives: list[str], pairs: PairDataset, env: Env,
           ckpt_dir: Path, log: Log, stop_after: int | None) -> dict[str, Any]:
    pcfg, scfg = cfg["pretrain"], cfg["pretrain"][f"stage{stage}"]
    # Dropout draws from the global generator, the objectives' masking and sampling from their own: both are
    # seeded per (seed, stage, rank) here (mvptr.seeds) and restored from the checkpoint on resume.
    seed = derive_seed(cfg["train_seed"], "pretrain", f"stage{stage}", "rank", env.rank)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(derive_seed(seed, "objectives"))
    step = PretrainStep(model, objectives, pcfg["objectives"], generator, **momentum_options(cfg))
    step_module = distribute(step, env)
    # pretrain.compile: the same module, its forward compiled (no_sync and train stay the wrapped module's).
    forward = torch.compile(step_module) if pcfg["compile"] else step_module
    optimizer, scheduler = build_optimizer(model, scfg)
    state = load_state(ckpt_dir, 0)
    start, history, window = 0, [], []
    if state is not None:
        step.load_state_dict(state["step_module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        if len(state["rng"]) == env.world_size:
            _set_rng_state(state["rng"][env.rank], generator)
            # the steps since the last log: the next logged mean covers them, as in a straight run
            window = list(state.get("windows", [[]] * env.world_size)[env.rank])
        else:
            log(f"resuming on {env.world_size} ranks a run saved on {len(state['rng'])}: fresh random states")
        log(f"stage {stage}: resumed at step {start} from {ckpt_dir}")
    tracker = StageRun(cfg, stage, ckpt_dir, env, log)
    steps, accum = scfg["steps"], pcfg["grad_accum"]
    end = steps if stop_after is None else min(steps, start + stop_after)
    micro = scfg["batch_size"] // env.world_size // accum
    if micro * accum * env.world_size != scfg["batch_size"]:
        raise ValueError(f"pretrain.stage{stage}.batch_size {scfg['batch_size']} must divide by grad_accum "
                         f"{accum} x {env.world_size} ranks")
    loader = DataLoader(pairs, batch_sampler=_micro_batches(len(pairs), scfg["batch_size"], micro, start, end, cfg,
                                                           env), collate_fn=collate,
                        num_workers=pcfg["num_workers"], pin_memory=env.device.type == "cuda",
                        persistent_workers=pcfg["num_workers"] > 0,
                        # Its own generator: a loader draws its workers' base seed when iterated, and a draw from
                        # the global generator would shift every later dropout mask of a resumed run.
                        generator=torch.Generator().manual_seed(derive_seed(seed, "loader")))
    batches = iter(loader)
    tick, tick_step = time.monotonic(), start
    use_bf16 = env.device.type == "cuda"
    preemption = _PreemptionSignal()
    for index in range(start, end):
        step_module.train()
        for k in range(accum):
            batch = {key: value.to(env.device, non_blocking=True) for key, value in next(batches).items()}
            sync = k == accum - 1 or env.world_size == 1
            context = step_module.no_sync() if not sync else contextlib.nullcontext()
            with context, torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, logs = forward(batch, step=index)
                (loss / accum).backward()
            window.append({k2: float(v) for k2, v in logs.items()})
        if pcfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step.after_step()
        done = index + 1
        if done % pcfg["log_every"] == 0 or done == steps:
            now = time.monotonic()
            rate = (done - tick_step) * scfg["batch_size"] / max(now - tick, 1e-9)
            metrics = {**_mean_logs(window), "lr": scheduler.get_last_lr()[0], "samples_per_s": rate}
            history.append({"step": done, **metrics})
            tracker.log(metrics, done)
            eta = (steps - done) * scfg["batch_size"] / max(rate, 1e-9)
            log(f"stage {stage} step {done}/{steps} ({100 * done / steps:.0f}%) loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} {rate:.0f} pairs/s ETA {eta:.0f}s")
            window, tick, tick_step = [], now, done
        signalled = preemption.requested(env)
        if done % pcfg["checkpoint_every"] == 0 or done == end or signalled:
            rng, windows = _gather(_rng_state(generator), env), _gather(window, env)
            if env.is_main:
                save_state(ckpt_dir, 0, {"step_module": step.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scheduler": scheduler.state_dict(), "step": done, "history": history,
                                         "rng": rng, "windows": windows, "mlflow_run_id": tracker.run_id or ""})
            if env.world_size > 1:
                dist.barrier()
        if signalled:
            log(f"stage {stage}: signal {signal.Signals(preemption.signum).name} at step {done}: checkpoint "
                f"written, handing over to the requeue")
            preemption.hand_over()
    preemption.restore()
    completed = end == steps
    if completed:
        tracker.close()
    final = history[-1] if history else {}
    return {"completed": completed, "history": history,
            "final": {k: v for k, v in final.items() if k != "step" and not math.isnan(v)},
            "mlflow_run_id": tracker.run_id}


def _micro_batches(num_items: int, batch_size: int, micro: int, start: int, end: int, cfg: Mapping[str, Any],
                   env: Env) -> list[list[int]]:
    """This rank's micro-batches of steps [start, end), in order."""
    out = []
    for step in range(start, end):
        mine = batch_indices(num_items, batch_size, step, cfg["train_seed"], env.rank, env.world_size)
        out += [mine[i:i + micro] for i in range(0, len(mine), micro)]
    return out
