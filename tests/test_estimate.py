"""Tests of `mvptr estimate` (mvptr.estimate): the FLOPs model against hand counts and torch's FlopCounterMode, the
time model against a real short pre-training run, and the command.

- FLOPs: one BERT layer by hand, and against FlopCounterMode on transformers' BertLayer / BertModel forward +
  backward (the same matmuls: equal exactly); a whole step of each method's PretrainStep and a fine-tuning
  forward + backward against FlopCounterMode (within 3%: what the model leaves out and the counter sees - the
  pooler, the ITM and contrastive projections and similarity matrices - and the masking draws, which the
  model takes at their expectation).
- Time: the step measured at batch 16, a real stage at batch 32 predicted from it and run (within 2x).
- The command: the table, the JSON, the benchmark JSON that benchmarks/bench_step.py writes, the GPUs of the
  launch settings, and one line with exit status 2 for bad input.

Run: `.venv/bin/pytest tests/test_estimate.py` (about a minute on 2 cores, with the session's tiny artifacts).
"""

from __future__ import annotations

import dataclasses
import json
import runpy
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, quiet, run_mvptr
from torch.utils.flop_counter import FlopCounterMode

from mvptr import estimate as est
from mvptr.cli import main
from mvptr.config import load_config
from mvptr.errors import ConfigError

# Small widths for the FlopCounterMode checks, a vocabulary of 2,000 rows so that the LM head does not drown
# the layers.
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=2",
         "pretrain.stage1.batch_size=16", "pretrain.stage2.batch_size=16", "regions.max_regions=10",
         "evaluate.vqa.batch_size=16"]
VOCAB = 2000


# --- (a) FLOPs -------------------------------------------------------------------------------------------


def test_one_bert_layer_by_hand():
    # n = 10 tokens, H = 64, I = 256:
    #   Q, K, V   3 x 2 x 10 x 64 x 64  = 245,760      scores QK^T  2 x 10 x 10 x 64 = 12,800
    #   output        2 x 10 x 64 x 64  =  81,920      values  PV   2 x 10 x 10 x 64 = 12,800
    #   FFN       2 x 2 x 10 x 64 x 256 = 655,360
    layer = est.bert_layer(10, 64, 256)
    assert layer.linear == 245_760 + 81_920 + 655_360
    assert layer.attention == 12_800 + 12_800
    assert layer.total == 1_008_640
    # + a cross-attention sub-layer, 10 queries over 4 keys: Q and output 2 x 2 x 10 x 64 x 64 = 163,840,
    # K and V 2 x 2 x 4 x 64 x 64 = 65,536, scores and values 2 x 2 x 10 x 4 x 64 = 10,240.
    cross = est.bert_layer(10, 64, 256, keys=4) - layer
    assert (cross.linear, cross.attention) == (163_840 + 65_536, 10_240)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_layer_and_model_forward_backward_match_flop_counter(impl):
    """FlopCounterMode counts the same matmuls as the model (it skips elementwise ops, as the model does), so they
    must agree exactly: a backward of a matmul whose input needs a gradient is two more matmuls of its size,
    hence 3x. SDPA's fused CPU kernel has no FLOP formula in torch (its CUDA kernels have), so on CPU the
    counter may see only the projections and the FFN of an SDPA layer: the linear part."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer, BertModel

    batch, n, hidden, inter = 3, 10, 64, 128
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=inter, attn_implementation=impl)
    layer = est.bert_layer(n, hidden, inter)
    x = torch.randn(batch, n, hidden, requires_grad=True)  # the input of a layer inside a model needs a gradient
    with FlopCounterMode(display=False) as counter:
        out = BertLayer(config)(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    expected = 3 * batch * layer.total
    if impl == "eager":
        assert counter.get_total_flops() == expected
    else:
        assert counter.get_total_flops() in (expected, 3 * batch * layer.linear)
    model = BertModel(config, add_pooling_layer=False)
    model.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 100, (batch, n))).last_hidden_state.sum().backward()
    assert counter.get_total_flops() == 3 * batch * 2 * layer.total


def _model_and_batch(cfg, stage: int, objectives=None):
    """A method's model as benchmarks/bench_step.py builds it, with eager attention (so that FlopCounterMode sees
    the attention matmuls on CPU), and a random batch with every slot filled."""
    from transformers import BertConfig

    from mvptr.models import model_class
    from mvptr.objectives import uses_questions

    torch.manual_seed(0)
    cls = model_class(cfg["method"]["name"])
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    config = cls.config_class(vocab_size=VOCAB, region_feature_dim=cfg["regions"]["feature_dim"],
                              objectives=list(cfg["pretrain"]["objectives"]),
                              **{k: v for s in ("model", "method") for k, v in cfg[s].items() if k in fields})
    model = cls(config)
    for module in model.modules():
        if isinstance(getattr(module, "config", None), BertConfig):
            module.config._attn_implementation = "eager"
    objectives = objectives or est.stage_objectives(cfg, stage)
    shape = est.stage_shape(cfg, stage)
    batch = est.random_batch(shape, cfg["regions"]["feature_dim"], "cpu",
                             config.qa_answers if uses_questions(objectives) else None, VOCAB)
    return model, batch, objectives, shape


@pytest.mark.parametrize("overrides, stage, step", [
    ([], 1, 0),  # MVPTR stage one: MCR
    ([], 2, 0),  # stage two: VSC, ITM, MLM, WPG
    (["ablation=joint", "pretrain.objectives.mcr.text=true"], 2, 0),  # all five in one pass, MCR on both sides
    (["method.name=simla"], 2, 0),  # step 0: no distillation yet (ramp), the momentum model's pair encoding
    (["method.name=simla", "method.distill_ramp_steps=0"], 2, 0),  # distilling: MLM's and XMM's momentum passes
    (["method.name=semvlp", "method.qa_answers=50"], 2, 0),  # single-stream step
    (["method.name=semvlp", "method.qa_answers=50"], 2, 1),  # two-stream step
])
def test_a_whole_step_matches_flop_counter(overrides, stage, step):
    from mvptr.objectives.step import PretrainStep, momentum_options

    cfg = load_config([*SMALL, *overrides])
    model, batch, objectives, shape = _model_and_batch(cfg, stage)
    module = PretrainStep(model, objectives, cfg["pretrain"]["objectives"], torch.Generator().manual_seed(0),
                          **momentum_options(cfg))
    with FlopCounterMode(display=False) as counter:
        loss, _ = module(batch, step=step)
        loss.backward()
    mode = None
    if cfg["method"]["name"] == "semvlp":
        mode = "single" if step == 0 else "two"  # mode_ratio [1, 1], block 1
    distilling = not (cfg["method"].get("distill_ramp_steps") and step == 0)
    passes = est.step_passes(cfg, objectives, shape, vocab=VOCAB, mode=mode, distilling=distilling)
    predicted = est.total(passes).total
    assert counter.get_total_flops() == pytest.approx(predicted, rel=0.03)


@pytest.mark.parametrize("method", ["mvptr", "simla", "semvlp"])
def test_a_fine_tuning_step_matches_flop_counter(method):
    """VQA's step: the question and the image encoded, fused and pooled (the answer head left out)."""
    overrides = [*SMALL, f"method.name={method}"] + (["method.downstream_mode=two"] if method == "semvlp" else [])
    cfg = load_config(overrides)
    model, batch, _, _ = _model_and_batch(cfg, 2)
    from mvptr.evaluate.heads import pooled

    with FlopCounterMode(display=False) as counter:
        text = model.encode_text(batch["input_ids"], batch["attention_mask"]).tokens
        pooled(model, text, batch["attention_mask"], batch).sum().backward()
    predicted = est.total(est.task_passes(cfg, "vqa", est.task_shape(cfg, "vqa"), VOCAB)).total
    assert counter.get_total_flops() == pytest.approx(predicted, rel=0.03)


# --- (b) Time against a real run ---------------------------------------------------------------------------

# Caps the tiny world's every caption and image fills (captions have >= 4 word pieces and >= 1 concept, images
# >= 3 tag slots; a batch of 32 always holds an image of >= 2 regions): each batch is then padded to exactly the
# slots the estimate counts. Width 384 so that the matmuls, not the per-op overhead, dominate a CPU step.
RUN = ["model.hidden_size=384", "model.intermediate_size=1536", "model.num_attention_heads=6",
       "pretrain.max_words=4", "pretrain.max_concepts=1", "pretrain.max_tags=3", "regions.max_regions=2",
       "ablation=joint", "pretrain.stage2.batch_size=32", "pretrain.stage2.steps=8",
       "pretrain.stage2.warmup_steps=1", "pretrain.log_every=8", "pretrain.checkpoint_every=1000",
       "launch.cluster=debug"]


@pytest.fixture
def one_thread():
    """One torch thread: on 2 shared cores, two OpenMP threads next to other processes slow down by 2-5x at
    random (measured here), one thread by what the load takes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_predicted_time_of_a_short_pretraining_run_is_within_2x_of_the_real_one(artifacts, tmp_path, one_thread):
    """Measure MVPTR's joint step (all five objectives) at batch 16, predict a stage of 8 steps at batch 32 (2x
    the FLOPs) and run it with the trainer (`train_stage`, what `mvptr pretrain stage` runs inside its job;
    launch.cluster=debug runs that in-process). The step is measured before and after the run and the mean
    taken, so that a change of the machine's load in between shows (then the comparison says nothing about the
    model: skipped, with the numbers). The prediction is compared with the steps' time as the trainer measures
    it (its samples/s), not with the job's start-up (model, data, MLflow: a fixed cost the estimate leaves out).

    Why 2x: on this shared 2-core machine a step's time moves by 30-50% from one minute to the next with the other
    processes; at these small shapes part of a step is per-op overhead that does not grow with the batch (so
    scaling the batch-16 step by the FLOPs overestimates: the trainer's steps took 0.65-0.9x the prediction
    here), while the real step adds AdamW over ~23M parameters and data loading (which the estimate leaves out)."""
    from mvptr.train.loop import FINAL_WEIGHTS, StagePaths, train_stage

    vocab = json.loads(Path(artifacts["vocab"]).read_text())["embedding_rows"]
    cfg = load_config(RUN)

    def paths(ckpt: Path, init: Path | None = None) -> StagePaths:
        return StagePaths(artifacts["dataset"], artifacts["concepts"], artifacts["vocab"], artifacts["regions"], ckpt,
                          init_weights=init)

    def measure() -> est.Measured:
        return est.measure_step(load_config([*RUN, "pretrain.stage2.batch_size=16"]), 2, rounds=3, vocab=vocab,
                                device="cpu")

    train_stage(cfg, 1, paths(tmp_path / "s1"), log=quiet)  # joint: stage one saves the initialised model
    before = measure()
    started = time.monotonic()
    result = train_stage(cfg, 2, paths(tmp_path / "s2", tmp_path / "s1" / FINAL_WEIGHTS), log=quiet)
    wall = time.monotonic() - started
    after = measure()
    measured = dataclasses.replace(before, seconds=(before.seconds + after.seconds) / 2)
    row = next(r for r in est.estimate_rows(cfg, measured, vocab=vocab) if r["rule"] == "pretrain_stage2")
    predicted = row["wall_h"] * 3600
    assert row["gpus"] == 1 and predicted == pytest.approx(measured.seconds * 2 * 8, rel=0.01)  # 2x the FLOPs
    steps_s, done = 0.0, 0
    for entry in result["history"]:
        steps_s += (entry["step"] - done) * 32 / entry["samples_per_s"]
        done = entry["step"]
    report = (f"measured {before.seconds:.3f} / {after.seconds:.3f} s/step at batch 16 before / after the run; "
              f"predicted {predicted:.2f} s for 8 steps at batch 32; the trainer's steps took {steps_s:.2f} s "
              f"(ratio {steps_s / predicted:.2f}; the whole stage {wall:.1f} s)")
    print(report)
    assert done == 8
    if max(before.seconds, after.seconds) > 1.5 * min(before.seconds, after.seconds):
        pytest.skip(f"the machine's load changed during the test: {report}")
    assert 0.5 <= steps_s / predicted <= 2.0, report


# --- (c) The command ---------------------------------------------------------------------------------------


def _recipe(tmp_path: Path, extra: dict | None = None) -> Path:
    recipe = {"pretrain": {"stage1": {"batch_size": 1024, "steps": 1000}, "stage2": {"batch_size": 1024,
                                                                                    "steps": 2000}},
              "regions": {"feature_dim": 2048}, "launch": {"cluster": "slurm", "nodes": 2, "gpus_per_node": 4}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, **(extra or {})}))
    return path


def test_the_command_prints_the_table_and_writes_the_json(tmp_path):
    out = tmp_path / "estimate.json"
    proc = run_mvptr("estimate", "--configfile", str(ROOT / "configs/models/bert_base.yaml"),
                     "--configfile", str(_recipe(tmp_path)), "--step-seconds", "0.5", "--json", str(out),
                     "--at", "model.name=tiny", "batch=64", "regions=10", check=True)
    text = proc.stdout
    for word in ("stage/task", "tokens/step", "TFLOPs/step", "GPU-h", "model: time(row)", "left out:",
                 "pretrain_stage1", "pretrain_stage2", *(f"evaluate_{t}" for t in est.TASKS), "total"):
        assert word in text, word
    rep = json.loads(out.read_text())
    rows = {r["rule"]: r for r in rep["rows"]}
    assert rep["recipe"]["model"] == "bert_base" and rep["measured"]["model"] == "tiny"
    # The arithmetic: 0.5 s x FLOPs(stage two at batch 1024, BERT-base) / FLOPs(tiny at batch 64) x 2000 steps
    # over the 2 x 4 GPUs of the launch settings.
    cfg = load_config(est.recipe_overrides([ROOT / "configs/models/bert_base.yaml", _recipe(tmp_path)]))
    measured = est.from_step_seconds(0.5, est.recipe_overrides([ROOT / "configs/models/bert_base.yaml",
                                                                _recipe(tmp_path)]),
                                     ["model.name=tiny", "batch=64", "regions=10"])
    assert measured.cfg["model"]["hidden_size"] == 128 and measured.shape.batch == 64
    flops = est.total(est.step_passes(cfg, ["vsc", "itm", "mlm", "wpg"], est.stage_shape(cfg, 2))).total
    stage2 = rows["pretrain_stage2"]
    assert stage2["gpus"] == 8 and stage2["batch"] == 1024
    assert stage2["tokens_per_step"] == 1024 * (42 + 20 + 50)
    assert stage2["tflops_per_step"] == pytest.approx(flops / 1e12)
    assert stage2["wall_h"] == pytest.approx(0.5 * flops / measured.flops(est.DEFAULT_VOCAB) * 2000 / 8 / 3600)
    assert stage2["gpu_h"] == pytest.approx(8 * stage2["wall_h"])
    assert rep["total"]["gpu_h"] == pytest.approx(sum(r["gpu_h"] for r in rep["rows"]))
    assert f"{stage2['tflops_per_step']:.4g}" in text


def test_the_benchmark_json_of_bench_step_is_read(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_step.py's own JSON (a one-round smoke run), then a scaled-up estimate from it."""
    bench = tmp_path / "step.json"
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--batch", "4", "--regions", "5", "--steps", "1",
                                      "--device", "cpu", "--out", str(bench)])
    runpy.run_path(str(ROOT / "benchmarks" / "bench_step.py"), run_name="__main__")
    capsys.readouterr()
    measured = est.from_benchmark(bench)
    data = json.loads(bench.read_text())
    assert measured.seconds == data["stage2_step_s"] and measured.shape.batch == 4 and measured.shape.regions == 5
    assert measured.shape.text == data["tokens"]["text"] and list(measured.objectives) == data["objectives"]
    assert main(["estimate", "--benchmark", str(bench), "pretrain.stage2.batch_size=128", "--gpus", "2",
                 "--efficiency", "0.5", "--eval-images", "100"]) == 0
    text = capsys.readouterr().out
    assert "--benchmark" in text and "evaluate_retrieval: + " in text
    rows = est.estimate_rows(load_config(["pretrain.stage2.batch_size=128"]), measured, gpus=2, efficiency=0.5)
    one = est.estimate_rows(load_config(["pretrain.stage2.batch_size=128"]), measured, gpus=1)
    assert rows[1]["wall_h"] == pytest.approx(one[1]["wall_h"])  # 2 GPUs at efficiency 0.5: no faster
    assert rows[1]["gpu_h"] == pytest.approx(2 * one[1]["gpu_h"])


@pytest.mark.parametrize("args, names", [
    (["--step-seconds", "0", "--at", "batch=8"], "--step-seconds"),
    (["--step-seconds", "-1.5"], "--step-seconds"),
    (["--step-seconds", "1", "--at", "pretrain.stage2.batchsize=8"], "pretrain.stage2.batchsize"),
    (["pretrain.stage9.steps=3", "--step-seconds", "1"], "pretrain.stage9"),
    (["--benchmark", "MISSING.json"], "MISSING.json"),
    (["--step-seconds", "1", "--gpus", "0"], "--gpus"),
])
def test_bad_input_exits_2_with_one_line_naming_it(args, names, capsys):
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mvptr: error: ") and names in err, err


def test_a_benchmark_json_without_its_fields_exits_2_naming_the_file_and_the_field(tmp_path):
    bench = tmp_path / "step_bert_base_cuda.json"
    bench.write_text(json.dumps({"method": "mvptr", "model": "bert_base", "batch": 64,
                                 "tokens": {"text": 42, "tags": 20, "regions": 10}}))
    proc = run_mvptr("estimate", "--benchmark", str(bench))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and str(bench) in err and "stage2_step_s" in err, err
    with pytest.raises(ConfigError, match="field 'tokens.regions' must be an integer"):
        bench.write_text(json.dumps({"method": "mvptr", "model": "bert_base", "batch": 64, "stage2_step_s": 0.4,
                                     "tokens": {"text": 42, "tags": 20, "regions": 0}}))
        est.from_benchmark(bench)


def test_gpus_come_from_the_rules_launch_settings_over_the_top_level_ones():
    cfg = load_config(["launch.cluster=slurm", "launch.rules.pretrain_stage2.nodes=4",
                       "launch.rules.pretrain_stage2.gpus_per_node=8", "launch.rules.evaluate_vqa.gpus_per_node=2"])
    assert est.rule_gpus(cfg, "pretrain_stage2") == 32
    assert est.rule_gpus(cfg, "evaluate_vqa") == 2
    assert est.rule_gpus(cfg, "evaluate_ve") == 1  # 0 GPUs: one device
    assert est.rule_gpus(load_config(["launch.cluster=slurm", "launch.nodes=2", "launch.gpus_per_node=4"]),
                         "pretrain_stage1") == 8


def test_semvlp_steps_split_by_its_schedule_and_the_measured_step_is_step_0():
    cfg = load_config(["method.name=semvlp", "method.mode_ratio=[2, 1]"])
    assert est.mode_steps(cfg, 7) == {"single": 5, "two": 2}  # S S T S S T S
    cfg = load_config(["method.name=semvlp", "method.mode_ratio=[1, 1]", "method.mode_block=3"])
    assert est.mode_steps(cfg, 8) == {"single": 5, "two": 3}  # SSS TTT SS
    assert est.first_step_mode(load_config(["method.name=semvlp", "method.mode_ratio=[0, 1]"])) == "two"
    assert est.mode_steps(load_config(), 10) == {None: 10}
