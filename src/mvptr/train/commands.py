"""`mvptr pretrain stage ...`: run one pre-training stage through submitit and write the rule's outputs.

    mvptr pretrain stage --stage 1|2 --dataset DIR --concepts FILE --vocab FILE --regions DIR \
        --ckpt-dir DIR --job-dir DIR --out DIR [--init-weights FILE] [key=value ...]

The stage runs as a submitit job (`launch.cluster`: local, slurm or debug), whose id is kept in --job-dir
(next to the rule's log) so that a restarted rule re-attaches to it; the job checkpoints into --ckpt-dir and
resumes from it. Only when the job succeeds are the outputs written, each atomically, into --out (and the
checkpoint directory removed, so that a forced rerun trains anew):
    model.safetensors   the stage's weights
    metrics.json        method, objectives, steps, final losses, loss history, seconds (stage two: zero-shot
                        retrieval)
    loss_curves.png     every objective's loss against the step

Then (the outputs are the record; a store that is down only warns) the stage's MLflow run (its id in
metrics.json, `mlflow_run_id`) gets them as artifacts, with the loss history (loss_history.json) and the
resolved config (config.yaml), and the dataset as its input; stage two links the stage-one run it started
from (`mvptr.tracking.link_stage1`: a stage one is shared by the ablations of a method). A job the launcher
gives up on (LaunchError, cancelled) or that raised leaves its run FAILED (run id from the checkpoint's run.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from mvptr.artifacts import add_artifact_arguments, artifact_paths
from mvptr.atomic import atomic_write_bytes, atomic_write_json
from mvptr.config import add_config_arguments, config_from_args


def _fit_batch_to_data(cfg: dict, args: argparse.Namespace, ranks: int) -> None:
    """Cap the stage's batch at the training pairs there are (mvptr.batching), before the job is submitted."""
    from mvptr.batching import count_training_pairs, fit_batch

    stage = cfg["pretrain"][f"stage{args.stage}"]
    size, note = fit_batch(f"pretrain.stage{args.stage}.batch_size", stage["batch_size"],
                           count_training_pairs(args.dataset, args.regions), ranks * cfg["pretrain"]["grad_accum"])
    if note:
        print(note, flush=True)
        stage["batch_size"] = size


def _mark_failed(ckpt_dir: Path) -> None:
    """The job is given up on: its run (if it got one) is FAILED, not left RUNNING."""
    from mvptr.artifacts import RUN_FILE

    run_file = ckpt_dir / RUN_FILE
    if not run_file.is_file():
        return
    from mvptr import tracking

    try:
        tracking.close_run(json.loads(run_file.read_text())["mlflow_run_id"], "FAILED")
    except Exception as err:  # the job's own error is the one to report
        print(f"warning: could not mark the MLflow run of {run_file} FAILED: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)


def _track(cfg: dict, args: argparse.Namespace, result: dict, out: Path) -> None:
    """Log the written outputs, config and dataset to the stage's run; link stage two to its stage one."""
    from mvptr import tracking

    run_id = result["mlflow_run_id"]
    files = [out / name for name in ("metrics.json", "loss_curves.png", "model.safetensors")]
    if not tracking.log_files(run_id, files, cfg, {"loss_history.json": {"history": result["history"]}}):
        return
    try:
        tracking.log_dataset(run_id, cfg, args.dataset, "training")
        tracking.log_dataset(tracking.parent_run(cfg), cfg, args.dataset, "training")
        stage1 = _stage1_run_id(args.init_weights) if args.stage == 2 else run_id
        if stage1:
            tracking.link_stage1(cfg, stage1, run_id if args.stage == 2 else None)
        tracking.finish_child(cfg, run_id)
    except Exception as err:  # the outputs are written: the store's failure must not fail the rule
        print(f"warning: MLflow run {run_id}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def _stage1_run_id(init_weights: Path | None) -> str | None:
    """The MLflow run of the stage one whose model.safetensors stage two starts from (its metrics.json)."""
    metrics = init_weights.parent / "metrics.json" if init_weights else None
    if metrics is None or not metrics.is_file():
        return None
    return json.loads(metrics.read_text()).get("mlflow_run_id")


def cmd_stage(args: argparse.Namespace) -> None:
    from mvptr.artifacts import FINAL_WEIGHTS, PENDING_FILE, StagePaths
    from mvptr.launch.job import ConfigJob
    from mvptr.launch.launcher import LaunchSettings, launch
    from mvptr.train.curves import loss_curves_png

    cfg = config_from_args(args)
    paths = StagePaths(**artifact_paths(args), ckpt_dir=args.ckpt_dir.resolve(),
                       init_weights=args.init_weights.resolve() if args.init_weights else None)
    settings = LaunchSettings.from_config(cfg["launch"], rule=f"pretrain_stage{args.stage}")
    print(f"launch pretrain_stage{args.stage} on {settings.describe()}", flush=True)
    _fit_batch_to_data(cfg, args, settings.nodes * settings.tasks_per_node)
    try:
        result = launch(ConfigJob("mvptr.jobs:run_stage", cfg, args.stage, paths),
                        name=f"pretrain_stage{args.stage}", folder=args.job_dir, settings=settings)
    except BaseException:
        _mark_failed(paths.ckpt_dir)
        raise
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    shutil.copyfile(paths.ckpt_dir / FINAL_WEIGHTS, tmp)
    tmp.replace(out / "model.safetensors")
    atomic_write_bytes(out / "loss_curves.png", loss_curves_png(result["history"], f"pretrain stage {args.stage}"))
    atomic_write_json(out / "metrics.json", result)
    # Steps logged while the MLflow store was down, never sent: kept beside the outputs, not lost with the checkpoint
    pending = paths.ckpt_dir / PENDING_FILE
    if pending.is_file():
        kept = out / PENDING_FILE
        pending.replace(kept)
        steps = len(kept.read_text().splitlines())
        print(f"mvptr: the MLflow store was unreachable to the end: {steps} logged step(s) are kept in {kept} "
              f"(and in metrics.json's history)", flush=True)
    # The outputs are the stage's record now. Its checkpoint goes, so that a forced rerun of the rule trains
    # again instead of resuming a finished run (a job killed before this line still resumes from it).
    shutil.rmtree(paths.ckpt_dir)
    if result.get("mlflow_run_id"):
        _track(cfg, args, result, out)
    summary = {k: result[k] for k in ("stage", "method", "objectives", "steps", "seconds")}
    if "zero_shot" in result:
        summary["zero_shot_r_at_1"] = {k: round(v, 2) for k, v in result["zero_shot"]["recalls"].items()
                                       if "_r_at_1" in k}
    print(json.dumps(summary, sort_keys=True))


def register(groups: argparse._SubParsersAction) -> None:
    pretrain = groups.add_parser("pretrain", help="pre-training stages").add_subparsers(dest="cmd", required=True)
    stage = pretrain.add_parser("stage", help="run one pre-training stage through submitit")
    stage.add_argument("--stage", type=int, choices=(1, 2), required=True)
    add_artifact_arguments(stage)
    stage.add_argument("--init-weights", type=Path, default=None, help="stage two: the stage-one model.safetensors")
    stage.add_argument("--ckpt-dir", type=Path, required=True, help="resumable training state (kept across reruns)")
    stage.add_argument("--out", type=Path, required=True, help="folder of model.safetensors, metrics.json, png")
    add_config_arguments(stage)
    stage.set_defaults(func=cmd_stage)
