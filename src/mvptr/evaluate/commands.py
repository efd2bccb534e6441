"""`mvptr evaluate run ...`: fine-tune and evaluate one downstream task through submitit, write its metrics;
`mvptr evaluate grounding ...`: zero-shot phrase grounding of pre-trained weights (`mvptr.evaluate.grounding`).

    mvptr evaluate run --task retrieval|vqa|ve|rec|nlvr2 --dataset DIR --concepts FILE --vocab FILE \
        --regions DIR --weights FILE --job-dir DIR --out FILE.json [--model-out FILE] [key=value ...]
    mvptr evaluate grounding --dataset DIR --concepts FILE --vocab FILE --regions DIR --weights FILE \
        --out FILE.json [key=value ...]

The fine-tuning (`mvptr.evaluate.finetune`, settings `evaluate.*`) runs as a submitit job (`launch.cluster`:
local, slurm or debug) whose id is kept in --job-dir (beside the rule's log), so that a restarted rule
re-attaches to it. Only when the job succeeds are the outputs written, each atomically: --out, the metrics
JSON (per split, with the chance levels beside them), and --model-out, the fine-tuned model and head
(safetensors, keys `model.*` and `head.*`). MLflow: the job opens the task's run of stage `evaluate` when it
starts (id in --job-dir/run.json, so a requeued job logs into the same run) and logs the fine-tuning loss per
step and the numeric metrics (names: the JSON's keys joined by '/'; `mvptr.evaluate.finetune`). Once the
outputs are written, this command logs the metrics JSON and the resolved config as the run's artifacts, ends
it, and puts the task's headline metrics on the ablation's parent run (a store that is down then only warns).
A job the launcher gives up on leaves its run FAILED. The "no pre-training" baseline is this command with the
weights of a model that was never trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mvptr.artifacts import HELP, add_artifact_arguments, artifact_paths
from mvptr.atomic import atomic_write_json
from mvptr.config import add_config_arguments, config_from_args
from mvptr.errors import ConfigError

# The saved weights wait in the job folder until the job has succeeded.
SAVED_WEIGHTS = "finetuned.safetensors"


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers to print: accuracy (VQA: overall) per split, retrieval's r_sum before and after."""
    out: dict[str, Any] = {"task": result["task"], "seconds": result["seconds"]}
    for split, metrics in result["splits"].items():
        for key in ("accuracy", "overall", "object", "attribute", "relation"):  # the last three: grounding
            if key in metrics:
                out[f"{split}_{key}"] = round(metrics[key], 2)
        for variant in ("zero_shot", "fine_tuned_vsc", "fine_tuned_itm"):
            if variant in metrics:
                out[f"{split}_{variant}_r_sum"] = round(metrics[variant]["r_sum"], 2)
    return out


def cmd_run(args: argparse.Namespace) -> None:
    from mvptr.errors import DataError

    cfg = config_from_args(args)
    if not args.weights.is_file():
        raise DataError(f"--weights {args.weights}: no such file")
    if args.task == "rec":  # the model class imports torch: only rec needs it here (a second a job otherwise)
        _check_rec_layer(cfg)
    # torch, transformers and MLflow are imported only once the arguments are known to be usable.
    from mvptr import tracking
    from mvptr.artifacts import RUN_FILE, TaskPaths
    from mvptr.batching import count_task_examples, fit_batch
    from mvptr.headline import flat_metrics
    from mvptr.launch.job import ConfigJob
    from mvptr.launch.launcher import LaunchSettings, launch

    artifacts = artifact_paths(args)  # each input checked (named by its option) before anything reads it
    key = f"evaluate.{args.task}.batch_size"
    size, note = fit_batch(key, cfg["evaluate"][args.task]["batch_size"],
                           count_task_examples(args.dataset, args.regions, args.task))
    if note:
        print(note, flush=True)
        cfg["evaluate"][args.task]["batch_size"] = size
    job_dir = args.job_dir.resolve()
    if args.task_concepts is not None and not args.task_concepts.is_file():
        raise DataError(f"--task-concepts {args.task_concepts}: no such file")
    paths = TaskPaths(**artifacts, weights=args.weights.resolve(),
                      save_to=job_dir / SAVED_WEIGHTS if args.model_out else None, run_dir=job_dir,
                      task_concepts=args.task_concepts.resolve() if args.task_concepts else None)
    settings = LaunchSettings.from_config(cfg["launch"], rule=f"evaluate_{args.task}")
    print(f"launch evaluate_{args.task} on {settings.describe()}", flush=True)
    try:
        result = launch(ConfigJob("mvptr.evaluate.finetune:finetune", cfg, args.task, paths),
                        name=f"evaluate_{args.task}", folder=job_dir, settings=settings)
    except BaseException:
        run_file = job_dir / RUN_FILE
        if run_file.is_file():
            _warn_on_store_error(lambda: tracking.close_run(json.loads(run_file.read_text())["mlflow_run_id"],
                                                            "FAILED"))
        raise
    if args.model_out:
        args.model_out.parent.mkdir(parents=True, exist_ok=True)
        (job_dir / SAVED_WEIGHTS).replace(args.model_out)
    atomic_write_json(args.out, result)
    (job_dir / RUN_FILE).unlink(missing_ok=True)  # a forced rerun of the rule starts a new run
    # The outputs are written; now the run gets them (an unusable store only warns).
    run_id = result["mlflow_run_id"]
    if tracking.log_files(run_id, [args.out], cfg):
        _warn_on_store_error(lambda: tracking.finish_child(
            cfg, run_id, headline=tracking.headline_metrics(args.task, flat_metrics(result))))
    print(json.dumps(headline(result), sort_keys=True))


def _check_rec_layer(cfg: dict[str, Any]) -> None:
    from mvptr.models import model_class

    layer, fusion_layers = cfg["evaluate"]["rec"]["layer"], model_class(cfg["method"]["name"]).fusion_layers(cfg)
    if layer > fusion_layers:
        raise ConfigError(f"config key 'evaluate.rec.layer': {layer} is more than the {fusion_layers} "
                          f"cross-modal layers of a {cfg['method']['name']} model of this config")


def _warn_on_store_error(call: Any) -> None:
    try:
        call()
    except Exception as err:  # the job's outcome (or the written outputs) is what counts, not the store's state
        print(f"warning: MLflow: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def register(groups: argparse._SubParsersAction) -> None:
    from mvptr.data.task_files import TASKS

    evaluate = groups.add_parser("evaluate", help="downstream fine-tuning and evaluation").add_subparsers(
        dest="cmd", required=True)
    run = evaluate.add_parser("run", help="fine-tune and evaluate one task through submitit")
    run.add_argument("--task", choices=TASKS, required=True)
    add_artifact_arguments(run)
    run.add_argument("--weights", type=Path, required=True,
                     help="model.safetensors to fine-tune (pre-trained, or never trained)")
    run.add_argument("--out", type=Path, required=True, help="metrics JSON")
    run.add_argument("--model-out", type=Path, default=None, help="where to save the fine-tuned model and head")
    run.add_argument("--task-concepts", type=Path, default=None,
                     help="scene graphs of the task texts (`mvptr concepts tasks`); without it they are parsed here")
    add_config_arguments(run)
    run.set_defaults(func=cmd_run)
    ground = evaluate.add_parser("grounding", help="zero-shot phrase-to-region grounding on the gold boxes (in-process)")
    for name, what in HELP.items():
        ground.add_argument(f"--{name}", type=Path, required=True, help=what)
    ground.add_argument("--weights", type=Path, required=True, help="model.safetensors of a pre-training stage")
    ground.add_argument("--out", type=Path, required=True, help="result JSON")
    add_config_arguments(ground)
    ground.set_defaults(func=_cmd_grounding)


def _cmd_grounding(args: argparse.Namespace) -> None:
    from mvptr.evaluate.grounding import cmd_grounding  # torch: only once the arguments parsed

    cmd_grounding(args)
