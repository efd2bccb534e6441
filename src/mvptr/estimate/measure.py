"""The measured step of `mvptr estimate`: a time given, read from the step benchmark's JSON, or measured here.

Why: the estimate scales one measured step by FLOPs; this module says at which config and shape that step was
taken. Use: `from_benchmark(path)`, `from_step_seconds(s, recipe, at)`, `measure_step(cfg)`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvptr.config import flatten, format_override, load_config, read_yaml
from mvptr.errors import ConfigError
from mvptr.estimate.flops import (
    DEFAULT_VOCAB,
    Pass,
    Shape,
    first_step_mode,
    stage_objectives,
    stage_shape,
    step_passes,
    total,
)

# `--at` shortcuts: the shape a step was measured at, in words (STAGE: the measured stage).
AT_ALIASES = {"batch": "pretrain.stageSTAGE.batch_size", "regions": "regions.max_regions",
              "words": "pretrain.max_words", "concepts": "pretrain.max_concepts", "tags": "pretrain.max_tags",
              "model": "model.name", "method": "method.name"}
# A measurement's own selectors replace the recipe's: the recipe's keys of that layer are dropped with it.
_SELECTOR_SECTIONS = {"model.name": ("model.",), "method.name": ("method.", "pretrain.objectives.",
                                                                 "pretrain.schedule")}
_BENCHMARK_FIELDS = ("method", "model", "batch", "tokens.text", "tokens.tags", "tokens.regions", "stage2_step_s")


# --- The measured step -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """A step time and what was measured: the config (method, model), the stage, the shape, the objectives."""

    seconds: float
    cfg: Mapping[str, Any] = field(repr=False)
    stage: int
    shape: Shape
    objectives: tuple[str, ...]
    source: str
    device: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def passes(self, vocab: int) -> list[Pass]:
        """The measured step is step 0 (bench_step and `measure_step` call the step so): SemVLP's first mode,
        and no distillation where the method ramps it up (SIMLA)."""
        return step_passes(self.cfg, self.objectives, self.shape, vocab=vocab, mode=first_step_mode(self.cfg),
                           distilling=not self.cfg["method"].get("distill_ramp_steps"))

    def flops(self, vocab: int) -> float:
        return total(self.passes(vocab)).total


def one_line(err: ConfigError) -> ConfigError:
    """A config error as one line (the schema's messages list the invalid keys on indented lines)."""
    return ConfigError(" ".join(str(err).split()))


def recipe_overrides(configfiles: Sequence[Path | str] = (), overrides: Sequence[str] = ()) -> list[str]:
    """`key=value` overrides from `--configfile`-style YAML files of overrides (later files win), then the
    command line's."""
    out: list[str] = []
    for path in configfiles:
        data = read_yaml(Path(path))
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: a recipe is a mapping of config keys, got {type(data).__name__}")
        out += [format_override(key, value) for key, value in flatten(data).items()]
    return out + list(overrides)


def measured_overrides(recipe: Sequence[str], at: Sequence[str], cfg: Mapping[str, Any], stage: int) -> list[str]:
    """The overrides of the measured config: the recipe's, then `--at` (aliases resolved, each key checked
    against the recipe's config); a selector in `--at` (model.name, method.name) drops the recipe's keys of
    that layer, so that `--at model.name=tiny` measures the tiny model, not tiny's name on BERT-base widths."""
    known = flatten(cfg)
    resolved = []
    for item in at:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--at {item!r}: not of the form key=value (e.g. batch=64 or regions.max_regions=10)")
        key = AT_ALIASES.get(key, key).replace("STAGE", str(stage))
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise ConfigError(f"--at {item.partition('=')[0]}: unknown config key (a dotted key of the config, or "
                              f"one of {', '.join(AT_ALIASES)})")
        resolved.append(f"{key}={value}")
    dropped: tuple[str, ...] = ()
    for selector, prefixes in _SELECTOR_SECTIONS.items():
        if any(item.startswith(selector + "=") for item in resolved):
            dropped += prefixes
    kept = [item for item in recipe if not item.partition("=")[0].startswith(dropped)] if dropped else list(recipe)
    return kept + resolved


def load_recipe(overrides: Sequence[str], base: Path | None = None, root: Path | None = None) -> dict[str, Any]:
    """`load_config`, its error on one line."""
    try:
        return load_config(overrides, base, root)
    except ConfigError as err:
        raise one_line(err) from err


def from_step_seconds(seconds: float, recipe: Sequence[str], at: Sequence[str], stage: int = 2,
                      base: Path | None = None, root: Path | None = None) -> Measured:
    """A step time the user gives (`--step-seconds`), measured at the recipe with `--at` overrides."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"--step-seconds: must be a number > 0, got {seconds!r}")
    cfg = load_recipe(recipe, base, root)
    measured = load_recipe(measured_overrides(recipe, at, cfg, stage), base, root)
    objectives = tuple(stage_objectives(measured, stage))
    if not objectives:
        raise ConfigError(f"--measured-stage {stage}: the measured config trains nothing in stage {stage} "
                          f"(schedule {measured['pretrain']['schedule']}); give the stage the time was measured on")
    return Measured(float(seconds), measured, stage, stage_shape(measured, stage), objectives,
                    source=f"--step-seconds {seconds:g}" + (f" at {' '.join(at)}" if at else ""))


def _field(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def from_benchmark(path: Path | str, root: Path | None = None) -> Measured:
    """The step benchmark's JSON (benchmarks/bench_step.py): its method, model, batch, token slots and median
    stage-two step seconds (`stage2_step_s`, forward + backward + the momentum update, no optimiser)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"--benchmark {path}: no such file (benchmarks/bench_step.py writes one)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--benchmark {path}: not JSON ({err})") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"--benchmark {path}: not a JSON object of benchmarks/bench_step.py")
    values = {}
    for name in _BENCHMARK_FIELDS:
        try:
            values[name] = _field(data, name)
        except KeyError:
            raise ConfigError(f"--benchmark {path}: no field {name!r} (expected the JSON of "
                              "benchmarks/bench_step.py)") from None
    seconds = values["stage2_step_s"]
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds > 0:
        raise ConfigError(f"--benchmark {path}: field 'stage2_step_s' must be a number > 0, got {seconds!r}")
    for name in ("batch", "tokens.text", "tokens.tags", "tokens.regions"):
        if not isinstance(values[name], int) or isinstance(values[name], bool) or values[name] < 1:
            raise ConfigError(f"--benchmark {path}: field {name!r} must be an integer >= 1, got {values[name]!r}")
    # bench_step builds its model from the default config with only the method and the model layer chosen.
    try:
        cfg = load_config([f"method.name={values['method']}", f"model.name={values['model']}"], root=root)
    except ConfigError as err:
        raise ConfigError(f"--benchmark {path}: {' '.join(str(err).split())}") from err
    mcfg = cfg["model"]
    layers = mcfg["num_text_layers"] + mcfg["num_visual_layers"] + mcfg["num_cross_layers"]
    for name, expected in (("hidden", mcfg["hidden_size"]), ("layers", layers)):
        if name in data and data[name] != expected:
            raise ConfigError(f"--benchmark {path}: field {name!r} is {data[name]!r} but configs/models/"
                              f"{values['model']}.yaml gives {expected}: measured on another model")
    concepts = cfg["pretrain"]["max_concepts"]
    words = values["tokens.text"] - 2 - concepts
    if words < 1:
        raise ConfigError(f"--benchmark {path}: field 'tokens.text' {values['tokens.text']} leaves no word slot")
    objectives = tuple(data.get("objectives") or stage_objectives(cfg, 2))
    unknown = sorted(set(objectives) - set(cfg["pretrain"]["objectives"]))
    if unknown:
        raise ConfigError(f"--benchmark {path}: field 'objectives' names {', '.join(unknown)}, which method "
                          f"{values['method']!r} does not have")
    shape = Shape(values["batch"], words, concepts, values["tokens.tags"], values["tokens.regions"])
    extra = {k: data[k] for k in ("dtype", "threads", "bare_bert_step_s", "ratio", "rounds") if k in data}
    return Measured(float(seconds), cfg, 2, shape, objectives, source=f"--benchmark {path}",
                    device=data.get("device"), extra=extra)


# --- Measuring a step here ---------------------------------------------------------------------------------


def random_batch(shape: Shape, feature_dim: int, device: Any, qa_answers: int | None = None,
                 vocab: int = DEFAULT_VOCAB) -> dict[str, Any]:
    """A batch of the `mvptr.objectives` layout with every slot filled (as benchmarks/bench_step.py's: random
    word pieces in [1000, min(30000, vocab))), plus one question per pair when `qa_answers` is given (SemVLP's
    QA)."""
    import torch

    g = torch.Generator().manual_seed(0)
    high = min(30000, vocab)
    b, text, words, concepts = shape.batch, shape.text, shape.words, shape.concepts
    ids = torch.randint(1000, high, (b, text), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    concept_mask = torch.zeros(b, text, dtype=torch.bool)
    concept_mask[:, 1 + words: 1 + words + concepts] = True
    links = torch.zeros(b, text, text, dtype=torch.bool)
    for c in range(concepts):
        links[:, 1 + words + c, 1 + c % words] = True
    tag_ids = torch.randint(1000, high, (b, shape.tags), generator=g)
    tag_ids[:, 0], tag_ids[:, -1] = 101, 102
    out = {"input_ids": ids, "attention_mask": torch.ones(b, text, dtype=torch.long), "concept_mask": concept_mask,
           "concept_links": links, "tag_ids": tag_ids, "tag_mask": torch.ones(b, shape.tags, dtype=torch.long),
           "region_feats": torch.randn(b, shape.regions, feature_dim, generator=g).half(),
           "region_boxes": torch.rand(b, shape.regions, 6, generator=g),
           "region_mask": torch.ones(b, shape.regions, dtype=torch.long),
           "region_tags": torch.randint(1000, high, (b, shape.regions), generator=g),
           "image_ids": torch.arange(b), "caption_ids": torch.arange(b)}
    if qa_answers is not None:
        question = torch.randint(1000, high, (b, 2 + words), generator=g)
        question[:, 0], question[:, -1] = 101, 102
        scores = torch.zeros(b, qa_answers)
        scores[torch.arange(b), torch.randint(0, qa_answers, (b,), generator=g)] = 1.0
        out.update(question_ids=question, question_mask=torch.ones_like(question), answer_scores=scores,
                   has_question=torch.ones(b, dtype=torch.bool))
    return {k: v.to(device) for k, v in out.items()}


def step_on_random_batch(cfg: Mapping[str, Any], objectives: Sequence[str], shape: Shape, device: Any,
                         vocab: int = DEFAULT_VOCAB) -> tuple[Any, Any, dict[str, Any]]:
    """(model, PretrainStep of `objectives`, random batch at `shape`) of cfg's method and model on `device`,
    what `--measure` and benchmarks/bench_step.py time. Built without the tokenizer (random ids need none; the
    special ids keep BERT's uncased defaults), so that it runs where the packaged vocabulary is not installed;
    otherwise as `VLConfig.from_project`: the model's and the method's keys, the heads of the objectives."""
    import dataclasses

    import torch

    from mvptr.models import model_class
    from mvptr.objectives import uses_questions
    from mvptr.objectives.step import PretrainStep, momentum_options

    pcfg, feature_dim = cfg["pretrain"], cfg["regions"]["feature_dim"]
    torch.manual_seed(0)
    model_cls = model_class(cfg["method"]["name"])
    fields = {f.name for f in dataclasses.fields(model_cls.config_class)}
    config = model_cls.config_class(vocab_size=vocab, region_feature_dim=feature_dim,
                                    objectives=list(pcfg["objectives"]),
                                    **{k: v for section in ("model", "method") for k, v in cfg[section].items()
                                       if k in fields})
    model = model_cls(config).to(device)
    step = PretrainStep(model, objectives, pcfg["objectives"], torch.Generator().manual_seed(0),
                        **momentum_options(cfg)).to(device)
    qa = config.qa_answers if uses_questions(objectives) else None
    return model, step, random_batch(shape, feature_dim, device, qa, vocab)


def measure_step(cfg: Mapping[str, Any], stage: int = 2, *, rounds: int = 3, vocab: int = DEFAULT_VOCAB,
                 device: str | None = None) -> Measured:
    """Time the stage's step (forward, backward, the momentum update; no optimiser, as bench_step) of `cfg`'s
    method and model on a random batch at `cfg`'s shape, here: the median of `rounds` calls after two warm-up
    calls. bf16 autocast on CUDA, as the trainer."""
    import torch

    objectives = stage_objectives(cfg, stage)
    if not objectives:
        raise ConfigError(f"--measured-stage {stage}: the config trains nothing in stage {stage} (schedule "
                          f"{cfg['pretrain']['schedule']}); measure stage 2")
    if rounds < 1:
        raise ConfigError(f"--measure-rounds: must be >= 1, got {rounds}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = stage_shape(cfg, stage)
    model, step, batch = step_on_random_batch(cfg, objectives, shape, dev, vocab)
    bf16 = dev.type == "cuda"

    def one_step() -> float:
        if bf16:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = step(batch)  # step 0: SemVLP's first mode, as bench_step
        loss.backward()
        model.zero_grad(set_to_none=True)
        step.after_step()
        if bf16:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = [one_step() for _ in range(rounds + 2)][2:]
    seconds = statistics.median(times)
    return Measured(seconds, cfg, stage, shape, tuple(objectives), source=f"--measure ({rounds} rounds)",
                    device=str(dev), extra={"threads": torch.get_num_threads(), "dtype": "bf16" if bf16 else "fp32",
                                            "round_seconds": [round(t, 5) for t in times]})


