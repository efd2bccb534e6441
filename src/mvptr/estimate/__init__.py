"""GPU-hours and wall time of a recipe, per pre-training stage and per downstream task, before anything is submitted.

Why: a paper-scale recipe (configs/experiments/<method>_4m.yaml: BERT-base, batch 1024, 100k+ steps) costs
thousands of GPU-hours, and what it costs follows from two things known beforehand: how long one step takes
at some shape on the hardware (a measurement), and how much more work a step of the recipe is than that
step (arithmetic on the config). This module is that arithmetic, as pure functions of the merged config;
`mvptr estimate` (mvptr.estimate_commands) prints it as a table.

Run:
    mvptr estimate --configfile configs/models/bert_base.yaml pretrain.stage2.batch_size=1024 \
        --benchmark results/benchmarks/step_bert_base_cuda.json          # the JSON of benchmarks/bench_step.py
    mvptr estimate --configfile RECIPE.yaml --step-seconds 0.41 --at model.name=bert_base batch=64 regions=10
    mvptr estimate --configfile RECIPE.yaml --measure --at batch=4       # time the step here, at a small shape
    ... [--gpus 8] [--efficiency 0.9] [--eval-images 5000] [--vocab-size 31522] [--json FILE]

The model (stated in the output too):
    tokens/step  batch x (text slots + tag slots + region slots): text = 2 + pretrain.max_words +
                 pretrain.max_concepts, tags = pretrain.max_tags (only for a method that encodes tags: MVPTR,
                 SemVLP with use_tags), regions = regions.max_regions (SIMLA adds its image [CLS]); NLVR2 two
                 images per example. Every slot is counted as filled: batches are padded to their longest item,
                 so a corpus of shorter captions or fewer regions costs less (the estimate is an upper bound).
    FLOPs/step   the matmuls of every transformer layer each pass of the step runs, for a sequence of n
                 tokens at width H and FFN width I (a multiply-add is 2 FLOPs):
                     QKV and output projections 8 n H^2, attention scores and values 4 n^2 H, FFN 4 n H I;
                     a cross-attention sub-layer (n queries, m keys) 4 n H^2 + 4 m H^2 + 4 n m H,
                 summed over the stacks and passes the method's step really runs (read from
                 src/mvptr/objectives/*.py and src/mvptr/models/*.py; `step_passes` lists them, e.g. MVPTR
                 stage two: text + visual encoders once, the cross encoder on the matched pairs (ITM and WPG
                 share it), again on ITM's negatives (B for `negatives: half`, 2B for `both`), MLM's second
                 text pass and its cross pass; SIMLA: the momentum model's forward; SemVLP: the mean over its
                 single- and two-stream steps by `method.mode_ratio`), plus the region projection and the
                 heads over the vocabulary at the positions they score (LM head at the expected masked words or
                 tags, XMM/MOP's tag head at the masked regions, PSL's keyword head). A pass with gradient counts
                 3x its forward (forward, input gradient, weight gradient), one without (the momentum model, an
                 output no loss reads, SemVLP's unread stream in a two-stream last layer) 1x, the region
                 projection 2x (its input needs no gradient). Checked against torch's FlopCounterMode on every
                 method's real step and a fine-tuning step: within 1% (tests/test_estimate.py).
    time         single-device seconds(row) = measured step seconds x FLOPs(row's step) / FLOPs(measured step)
                 x steps (+ the evaluation passes, at the same seconds per FLOP); wall = that / (N x efficiency)
                 on N > 1 GPUs (efficiency: `--efficiency`, default 1.0 = linear scaling); GPU-hours = wall x N.
                 N: `--gpus`, else launch.rules.<rule>.{nodes, gpus_per_node} over launch.{nodes, gpus_per_node}
                 (0 GPUs: one device). The measured step is one device's forward + backward + momentum update
                 of the stage's step 0 (as bench_step times it: SemVLP's first mode, SIMLA before its
                 distillation ramps up), without the optimiser. A real 8-step CPU run at twice the measured
                 batch took 0.65-0.9x the prediction (tests/test_estimate.py).
    evaluation   with `--eval-images N` (`--eval-texts`, default 5 N): retrieval's forward passes, per
                 METHODS.md's protocol - every test image and text encoded before and after fine-tuning, ITM
                 on k_text x N + k_image x texts pairs (SemVLP, without contrastive embeddings: on every pair) -
                 and stage two's zero-shot encoding. Without it, and for the other tasks' evaluation splits
                 (their sizes are the data's), evaluation is left out.
Left out (each small at paper scale, or not a matmul): embeddings and LayerNorm/softmax/GELU/dropout, the
pooler and the 2-/3-way and answer classifiers, the contrastive projections and similarity matrices (SIMLA's
65,536-entry queue: ~0.1% of its step at BERT-base, batch 512), AdamW and the momentum EMA update (elementwise over the
parameters), data loading, start-up, checkpoints, MLflow; kernel efficiency is taken to be the same at every
shape (a small measured batch under-uses a GPU, so the estimate errs high), and attention as dense n^2.

Use:
    measured = from_benchmark("results/benchmarks/step_bert_base_cuda.json")   # or from_step_seconds, measure_step
    rows = estimate_rows(cfg, measured, vocab=30522, gpus=8)
    print(format_table(report(cfg, measured, rows, vocab=30522)))
"""

from mvptr.estimate.flops import (DEFAULT_VOCAB, TASKS, bert_layer, first_step_mode, mode_steps, rule_gpus,
                                  stage_objectives, stage_shape, step_passes, task_passes, task_shape, total)
from mvptr.estimate.measure import (Measured, from_benchmark, from_step_seconds, load_recipe, measure_step,
                                    measured_overrides, random_batch, recipe_overrides)
from mvptr.estimate.table import estimate_rows, format_table, report

__all__ = ["DEFAULT_VOCAB", "TASKS", "Measured", "bert_layer", "estimate_rows", "first_step_mode", "format_table",
           "from_benchmark", "from_step_seconds", "load_recipe", "measure_step", "measured_overrides", "mode_steps",
           "random_batch", "recipe_overrides", "report", "rule_gpus", "stage_objectives", "stage_shape", "step_passes",
           "task_passes", "task_shape", "total"]
