"""The estimate itself: per stage and task, steps, tokens, FLOPs, GPUs, wall time and GPU-hours (mvptr.estimate).

Why: turns a measured step (mvptr.estimate.measure) and the FLOPs model (mvptr.estimate.flops) into the rows
that `mvptr estimate` prints and writes. Use: `format_table(report(cfg, measured, estimate_rows(cfg, measured)))`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mvptr.errors import ConfigError
from mvptr.estimate.flops import (
    DEFAULT_VOCAB,
    STAGES,
    Pass,
    Shape,
    architecture,
    head_name,
    mode_steps,
    rule_gpus,
    stage_objectives,
    stage_shape,
    step_passes,
    task_passes,
    task_shape,
    tokens_per_step,
    total,
)
from mvptr.estimate.measure import Measured

# --- The estimate ------------------------------------------------------------------------------------------


def evaluation_passes(cfg: Mapping[str, Any], row: str, images: int, texts: int,
                      vocab: int = DEFAULT_VOCAB) -> list[Pass]:
    """Forward passes of retrieval's evaluation on `images` test images and `texts` captions (row
    evaluate_retrieval), and of stage two's zero-shot retrieval (row pretrain_stage2)."""
    arch = architecture(cfg, vocab)
    shape = task_shape(cfg, "retrieval")
    contrastive = any(head_name(o) == "contrastive" for o in cfg["pretrain"]["objectives"])
    encode = [Pass("encode test images", arch.image(shape), images, 1),
              Pass("test images' region projection", arch.region_projection(shape), images, 1),
              Pass("encode test texts", arch.text(shape.text), texts, 1)]
    if row == "pretrain_stage2":
        passes = encode if contrastive else []
    elif row == "evaluate_retrieval":
        rcfg = cfg["evaluate"]["retrieval"]
        if contrastive:  # zero-shot before fine-tuning, then the fine-tuned encodings and ITM re-ranking
            pairs = min(rcfg["k_text"], texts) * images + min(rcfg["k_image"], images) * texts
            passes = [Pass(p.name, p.flops, 2 * p.count, 1) for p in encode]
            passes.append(Pass(f"ITM on {pairs} re-ranked pairs", arch.fuse(shape.text, shape), pairs, 1))
        else:  # every pair by ITM
            passes = encode + [Pass(f"ITM on all {images * texts} pairs", arch.fuse(shape.text, shape),
                                    images * texts, 1)]
    else:
        passes = []
    return [p for p in passes if p.flops.total > 0 and p.count > 0]


def estimate_rows(cfg: Mapping[str, Any], measured: Measured, *, vocab: int = DEFAULT_VOCAB,
                  gpus: int | None = None, efficiency: float = 1.0, eval_images: int | None = None,
                  eval_texts: int | None = None) -> list[dict[str, Any]]:
    """One row per pre-training stage and per task of evaluate.tasks: steps, batch, tokens/step, FLOPs/step,
    GPUs, wall and GPU hours (the module docstring's model)."""
    if not 0 < efficiency <= 1:
        raise ConfigError(f"--efficiency: must be in (0, 1], got {efficiency!r}")
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {gpus!r}")
    for flag, value in (("--eval-images", eval_images), ("--eval-texts", eval_texts)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value!r}")
    if eval_texts is not None and eval_images is None:
        raise ConfigError("--eval-texts: counts retrieval's test captions, and needs --eval-images (the test images)")
    measured_flops = measured.flops(vocab)
    seconds_per_flop = measured.seconds / measured_flops
    arch = architecture(cfg, vocab)
    texts = eval_texts or (5 * eval_images if eval_images else None)
    specs: list[tuple[str, Shape, dict[str | None, list[Pass]], int, int]] = []
    for stage in STAGES:
        shape = stage_shape(cfg, stage)
        objectives = stage_objectives(cfg, stage)
        steps = cfg["pretrain"][f"stage{stage}"]["steps"] if objectives else 0
        modes = mode_steps(cfg, steps) if steps else {}
        per_mode = {mode: step_passes(cfg, objectives, shape, vocab=vocab, mode=mode) for mode in modes}
        specs.append((f"pretrain_stage{stage}", shape, per_mode, steps, 1))
    for task in cfg["evaluate"]["tasks"]:
        shape = task_shape(cfg, task)
        steps = cfg["evaluate"][task]["steps"]
        specs.append((f"evaluate_{task}", shape, {None: task_passes(cfg, task, shape, vocab)}, steps,
                      2 if task == "nlvr2" else 1))
    rows = []
    for rule, shape, per_mode, steps, images in specs:
        counts = mode_steps(cfg, steps) if rule.startswith("pretrain") else {None: steps}
        train = sum(total(per_mode[mode]).total * count for mode, count in counts.items() if mode in per_mode)
        step_flops = train / steps if steps else 0.0
        evaluation = evaluation_passes(cfg, rule, eval_images, texts, vocab) if eval_images else []
        eval_flops = total(evaluation).total
        n = gpus or rule_gpus(cfg, rule)
        single_s = (train + eval_flops) * seconds_per_flop
        wall_s = single_s / (n * efficiency) if n > 1 else single_s
        passes = [{"mode": mode, "name": p.name, "count": p.count, "factor": p.factor,
                   "tflops_per_step": p.step_flops.total / 1e12} for mode, plist in per_mode.items() for p in plist]
        rows.append({"rule": rule, "steps": steps, "batch": shape.batch,
                     "tokens_per_step": tokens_per_step(arch, shape, images) if steps else 0,
                     "tflops_per_step": step_flops / 1e12, "gpus": n, "wall_h": wall_s / 3600,
                     "gpu_h": wall_s * n / 3600, "eval_tflops": eval_flops / 1e12,
                     "modes": {str(mode): count for mode, count in counts.items()} if len(counts) > 1 else None,
                     "passes": passes,
                     "eval_passes": [{"name": p.name, "count": p.count, "tflops": p.step_flops.total / 1e12}
                                     for p in evaluation]})
    return rows


MODEL_TEXT = ("time(row) = measured step s x FLOPs(row step) / FLOPs(measured step) x steps [+ evaluation passes]"
              " / (GPUs x efficiency); FLOPs: the matmuls of every layer of every pass the step runs (8nH^2 + "
              "4n^2H + 4nHI per layer, cross-attention 4nH^2 + 4mH^2 + 4nmH), x3 with gradient, plus the "
              "vocabulary heads; tokens: batch x (text + tag + region slots)")
LEFT_OUT = ("embeddings, LayerNorm/softmax/GELU, pooler and small classifiers, contrastive similarities (and "
            "SIMLA's queue), AdamW and EMA updates, data loading and start-up; every slot counted as filled "
            "(padding to the longest item makes real batches cheaper); the same kernel efficiency at every shape")


def report(cfg: Mapping[str, Any], measured: Measured, rows: Sequence[Mapping[str, Any]], *,
           vocab: int = DEFAULT_VOCAB, efficiency: float = 1.0) -> dict[str, Any]:
    """The estimate as one JSON-able mapping: the recipe, the measurement, the model, the rows and the totals."""
    flops = measured.flops(vocab)
    pretrain = [r for r in rows if r["rule"].startswith("pretrain")]
    tasks = [r for r in rows if r["rule"].startswith("evaluate")]
    mcfg = cfg["model"]
    return {
        "recipe": {"method": cfg["method"]["name"], "ablation": cfg["ablation"],
                   "schedule": cfg["pretrain"]["schedule"], "model": mcfg["name"], "hidden": mcfg["hidden_size"],
                   "layers": [mcfg["num_text_layers"], mcfg["num_visual_layers"], mcfg["num_cross_layers"]],
                   "vocab": vocab},
        "measured": {"source": measured.source, "device": measured.device, "seconds": measured.seconds,
                     "stage": measured.stage, "method": measured.cfg["method"]["name"],
                     "model": measured.cfg["model"]["name"], "batch": measured.shape.batch,
                     "text": measured.shape.text, "tags": measured.shape.tags, "regions": measured.shape.regions,
                     "objectives": list(measured.objectives), "tflops_per_step": flops / 1e12,
                     "achieved_tflops_per_s": flops / measured.seconds / 1e12, **dict(measured.extra)},
        "model": MODEL_TEXT, "left_out": LEFT_OUT, "efficiency": efficiency,
        "rows": list(rows),
        "total": {"wall_h": sum(r["wall_h"] for r in rows), "gpu_h": sum(r["gpu_h"] for r in rows),
                  # the tasks depend only on stage two: run side by side, the longest one is on the critical path
                  "critical_path_h": sum(r["wall_h"] for r in pretrain) + max((r["wall_h"] for r in tasks),
                                                                              default=0.0)},
    }


def _hours(h: float) -> str:
    return f"{h:.3f}" if h < 10 else f"{h:,.1f}"


def format_table(rep: Mapping[str, Any]) -> str:
    """The report as text: what was measured, the model, one line per stage and task, the total."""
    r, m = rep["recipe"], rep["measured"]
    lines = [
        f"recipe: method {r['method']} (ablation {r['ablation']}, schedule {r['schedule']}), model {r['model']} "
        f"({'+'.join(map(str, r['layers']))} layers, hidden {r['hidden']}), vocabulary {r['vocab']}",
        f"measured: {m['seconds']:.4g} s/step of stage {m['stage']} ({', '.join(m['objectives'])}) of "
        f"{m['method']}/{m['model']} at batch {m['batch']}, text {m['text']} + tags {m['tags']} + regions "
        f"{m['regions']} slots, on {m['device'] or 'an unnamed device'} [{m['source']}]: "
        f"{m['tflops_per_step']:.4g} TFLOPs/step = {m['achieved_tflops_per_s']:.4g} TFLOP/s achieved",
        f"model: {rep['model']}; scaling efficiency {rep['efficiency']:g}",
        f"left out: {rep['left_out']}",
        "",
    ]
    header = ("stage/task", "steps", "batch", "tokens/step", "TFLOPs/step", "GPUs", "wall h", "GPU-h")
    table = [header]
    for row in rep["rows"]:
        table.append((row["rule"], f"{row['steps']:,}", f"{row['batch']:,}", f"{row['tokens_per_step']:,}",
                      f"{row['tflops_per_step']:.4g}", str(row["gpus"]), _hours(row["wall_h"]), _hours(row["gpu_h"])))
    total_ = rep["total"]
    table.append(("total", "", "", "", "", "", _hours(total_["wall_h"]), _hours(total_["gpu_h"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for index, row in enumerate(table):
        if index == len(table) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))))
    lines.append(f"critical path (tasks side by side after stage two): {_hours(total_['critical_path_h'])} h")
    notes = [f"{row['rule']}: + {row['eval_tflops']:.4g} TFLOPs of evaluation passes" for row in rep["rows"]
             if row["eval_tflops"]]
    modes = [f"{row['rule']}: steps per mode {row['modes']}" for row in rep["rows"] if row.get("modes")]
    lines += notes + modes
    if not notes:
        lines.append("evaluation passes left out (give --eval-images N to count retrieval's)")
    return "\n".join(lines)

