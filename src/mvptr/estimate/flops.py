"""The FLOPs of each method's training and fine-tuning steps, from the config's layer shapes (mvptr.estimate).

Why: the cost model of `mvptr estimate` - which passes a step runs over which stacks, and what they cost -
kept apart from the measured step time and the table. Use: `total(step_passes(cfg, objectives, shape))`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mvptr.errors import ConfigError

# Rows of the shared word-embedding table before concepts are added: the uncased BERT vocabulary (minilm).
DEFAULT_VOCAB = 30522
TASKS = ("retrieval", "vqa", "ve", "rec", "nlvr2")
STAGES = (1, 2)

# --- FLOPs of the building blocks (forward, one sequence) -------------------------------------------------


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs split into the dense projections (what torch's FlopCounterMode sees on CPU, where SDPA's
    fused kernel is not counted) and the attention score and value matmuls."""

    linear: float = 0.0
    attention: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.linear + other.linear, self.attention + other.attention)

    def __sub__(self, other: Flops) -> Flops:
        return Flops(self.linear - other.linear, self.attention - other.attention)

    def __mul__(self, k: float) -> Flops:
        return Flops(self.linear * k, self.attention * k)

    __rmul__ = __mul__


ZERO = Flops()


def dense(tokens: float, d_in: int, d_out: int) -> Flops:
    """A Linear(d_in -> d_out) over `tokens` rows: 2 tokens d_in d_out."""
    return Flops(linear=2.0 * tokens * d_in * d_out)


def self_attention(n: int, hidden: int) -> Flops:
    """BERT's self-attention over n tokens: Q, K, V and output projections 8 n H^2; QK^T and PV 4 n^2 H (the
    heads split H, so their count does not change the sum)."""
    return Flops(linear=8.0 * n * hidden * hidden, attention=4.0 * n * n * hidden)


def cross_attention(n: int, m: int, hidden: int) -> Flops:
    """A cross-attention sub-layer: n queries (Q and output projections 4 n H^2) over m keys (K, V 4 m H^2),
    scores and values 4 n m H."""
    return Flops(linear=4.0 * n * hidden * hidden + 4.0 * m * hidden * hidden, attention=4.0 * n * m * hidden)


def feed_forward(n: int, hidden: int, intermediate: int) -> Flops:
    """BERT's FFN: H -> I -> H, 4 n H I."""
    return Flops(linear=4.0 * n * hidden * intermediate)


def bert_layer(n: int, hidden: int, intermediate: int, keys: int = 0) -> Flops:
    """One BertLayer over n tokens (with a cross-attention sub-layer over `keys` tokens when keys > 0)."""
    flops = self_attention(n, hidden) + feed_forward(n, hidden, intermediate)
    return flops + cross_attention(n, keys, hidden) if keys else flops


# --- The step's passes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One step's inputs: `batch` pairs (or examples), each with its text and image slots."""

    batch: int
    words: int
    concepts: int
    tags: int
    regions: int

    @property
    def text(self) -> int:
        """`[CLS] words concepts [SEP]`."""
        return 2 + self.words + self.concepts


@dataclass(frozen=True)
class Pass:
    """A model call of a step: forward FLOPs per item, `count` items per step, `factor` 3 (with gradient),
    2 (weight gradient only) or 1 (no gradient)."""

    name: str
    flops: Flops
    count: float
    factor: int = 3

    @property
    def step_flops(self) -> Flops:
        return self.flops * (self.count * self.factor)


@dataclass(frozen=True)
class Dims:
    """The widths and depths of the recipe's model (configs/models/, method.*) and the vocabulary."""

    hidden: int
    intermediate: int
    text_layers: int
    visual_layers: int
    cross_layers: int
    vocab: int
    feature_dim: int
    projection: int  # the contrastive embedding width (method.projection_dim, default hidden)
    image_layers: int  # SIMLA's region encoder (method.num_image_layers, default num_visual_layers)
    co_layers: int  # SemVLP's top layers with cross-attention (method.cross_attention_layers, default cross)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], vocab: int) -> Dims:
        model, method = cfg["model"], cfg["method"]
        return cls(hidden=model["hidden_size"], intermediate=model["intermediate_size"],
                   text_layers=model["num_text_layers"], visual_layers=model["num_visual_layers"],
                   cross_layers=model["num_cross_layers"], vocab=vocab, feature_dim=cfg["regions"]["feature_dim"],
                   projection=method.get("projection_dim") or model["hidden_size"],
                   image_layers=method.get("num_image_layers") or model["num_visual_layers"],
                   co_layers=method.get("cross_attention_layers") or model["num_cross_layers"])

    @property
    def shared_layers(self) -> int:
        """SIMLA's and SemVLP's one stack: num_text_layers + num_cross_layers."""
        return self.text_layers + self.cross_layers

    def layers(self, count: int, n: int, keys: int = 0) -> Flops:
        return bert_layer(n, self.hidden, self.intermediate, keys) * count

    def vocab_head(self, tokens: float) -> Flops:
        """BertLMPredictionHead at `tokens` positions: transform H -> H, decoder H -> vocab."""
        return dense(tokens, self.hidden, self.hidden) + dense(tokens, self.hidden, self.vocab)


class Architecture:
    """Forward FLOPs per item of a method's model calls (the interface of mvptr.models.base)."""

    # Whether `fuse` starts from the text encoder's output (MVPTR), so that a text pass feeding a fusion gets
    # gradient; SIMLA's fusion starts again from the embeddings (its text-mode pass then only gives the [CLS]).
    text_feeds_fusion = True
    reads_tags = True

    def __init__(self, cfg: Mapping[str, Any], dims: Dims) -> None:
        self.cfg, self.d = cfg, dims

    def text(self, n: int) -> Flops:
        raise NotImplementedError

    def image(self, shape: Shape) -> Flops:
        """The image encoder's stack (the region projection is `region_projection`)."""
        raise NotImplementedError

    def fuse(self, n_text: int, shape: Shape, num_layers: int | None = None, mode: str | None = None) -> Flops:
        raise NotImplementedError

    def unread(self, n_text: int, shape: Shape, reads: str, mode: str | None = None) -> Flops:
        """The part of a full `fuse` that a loss reading only `reads` (text | regions | both) never reaches, so
        that backward skips it: none where the two sides are one tensor (autograd does not prune positions)."""
        return ZERO

    def region_projection(self, shape: Shape) -> Flops:
        return dense(shape.regions, self.d.feature_dim + 6, self.d.hidden)

    def image_slots(self, shape: Shape) -> int:
        """The image-side tokens per image that the model reads (for tokens/step)."""
        return shape.regions + (shape.tags if self.reads_tags else 0)


class MVPTRArchitecture(Architecture):
    """Text encoder over the text, visual encoder over `[CLS] tags [SEP] regions`, cross encoder over
    `[text ; regions]` (mvptr.models.mvptr)."""

    def text(self, n: int) -> Flops:
        return self.d.layers(self.d.text_layers, n)

    def image(self, shape: Shape) -> Flops:
        return self.d.layers(self.d.visual_layers, shape.tags + shape.regions)

    def fuse(self, n_text: int, shape: Shape, num_layers: int | None = None, mode: str | None = None) -> Flops:
        return self.d.layers(num_layers or self.d.cross_layers, n_text + shape.regions)


class SIMLAArchitecture(Architecture):
    """One shared stack (text mode: self-attention only; multimodal: every layer cross-attends to the image's
    `[CLS] regions`) and a region encoder over `[CLS] regions` (mvptr.models.simla)."""

    text_feeds_fusion = False
    reads_tags = False

    def text(self, n: int) -> Flops:
        return self.d.layers(self.d.shared_layers, n)

    def image(self, shape: Shape) -> Flops:
        return self.d.layers(self.d.image_layers, 1 + shape.regions)

    def fuse(self, n_text: int, shape: Shape, num_layers: int | None = None, mode: str | None = None) -> Flops:
        return self.d.layers(num_layers or self.d.shared_layers, n_text, keys=1 + shape.regions)

    def reconstruct(self, shape: Shape) -> Flops:
        """XMM: the image tokens through the shared stack, cross-attending to the text embeddings."""
        return self.d.layers(self.d.shared_layers, 1 + shape.regions, keys=shape.text)

    def cls_attention(self, shape: Shape) -> Flops:
        """PSL: all but the last shared layer in multimodal mode, then the last layer's [CLS] query and keys."""
        n, h = shape.text, self.d.hidden
        return (self.fuse(n, shape, self.d.shared_layers - 1) + dense(1 + n, h, h)
                + Flops(attention=2.0 * n * h))

    def image_slots(self, shape: Shape) -> int:
        return 1 + shape.regions


class SemVLPArchitecture(Architecture):
    """One shared stack over the embeddings: single-stream over `[image ; text]`, or two-stream - each stream
    alone, the top k layers with a cross-attention sub-layer each way (mvptr.models.semvlp)."""

    def __init__(self, cfg: Mapping[str, Any], dims: Dims) -> None:
        super().__init__(cfg, dims)
        self.reads_tags = bool(cfg["method"].get("use_tags", False))

    def text(self, n: int) -> Flops:
        return ZERO  # encode_text is the embeddings

    def image(self, shape: Shape) -> Flops:
        return ZERO  # encode_image is the region projection (+ tag embeddings)

    def fuse(self, n_text: int, shape: Shape, num_layers: int | None = None, mode: str | None = None) -> Flops:
        m = self.image_slots(shape)
        layers = num_layers or self.d.shared_layers
        if (mode or self.cfg["method"].get("downstream_mode", "single")) == "single":
            return self.d.layers(layers, n_text + m)
        first_cross = self.d.shared_layers - self.d.co_layers
        flops = ZERO
        for index in range(layers):
            flops = flops + self.d.layers(1, n_text) + self.d.layers(1, m)
            if index >= first_cross:
                flops = flops + cross_attention(n_text, m, self.d.hidden) + cross_attention(m, n_text, self.d.hidden)
        return flops

    def unread(self, n_text: int, shape: Shape, reads: str, mode: str | None = None) -> Flops:
        """Two-stream: the last layer's sub-layers of the stream the loss does not read (after_self: its
        cross-attention and FFN - its self-attention gives the read stream's keys; before_self: the whole
        layer of that stream, as the read stream's keys are the layer's inputs)."""
        if (mode or self.cfg["method"].get("downstream_mode", "single")) == "single" or reads == "both":
            return ZERO
        m = self.image_slots(shape)
        other, keys = (m, n_text) if reads == "text" else (n_text, m)
        h = self.d.hidden
        flops = cross_attention(other, keys, h) + feed_forward(other, h, self.d.intermediate)
        if self.cfg["method"].get("cross_attention_position", "after_self") == "before_self":
            flops = flops + self_attention(other, h)
        return flops


ARCHITECTURES = {"mvptr": MVPTRArchitecture, "simla": SIMLAArchitecture, "semvlp": SemVLPArchitecture}


def architecture(cfg: Mapping[str, Any], vocab: int) -> Architecture:
    name = cfg["method"]["name"]
    if name not in ARCHITECTURES:
        raise ConfigError(f"config key 'method.name': no FLOPs model for method {name!r}; "
                          f"known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](cfg, Dims.from_config(cfg, vocab))


def expected_masked_regions(regions: int, prob: float) -> float:
    """`mask_regions`: each region with probability p, and one more when none was picked."""
    return prob * regions + (1.0 - prob) ** regions if regions else 0.0


def head_name(objective: str) -> str | None:
    from mvptr.objectives import load_objective

    return load_objective(objective).head_name


def _uses_pairs(objective: str) -> bool:
    from mvptr.objectives import load_objective

    return load_objective(objective).uses_pairs


# The objectives whose loss reads the shared pair encoding's image side (so that its encoder gets gradient), and
# its text side: the [CLS] (contrastive) or, where the fusion starts from the text encoder (MVPTR), the tokens.
_READ_PAIR_IMAGE = {"vsc", "itc", "itm", "mlm", "wpg", "psl", "qa"}
_READ_PAIR_CLS = {"vsc", "itc"}
_READ_PAIR_TOKENS = {"itm", "wpg", "mop"}


def step_passes(cfg: Mapping[str, Any], objectives: Sequence[str], shape: Shape, *, vocab: int = DEFAULT_VOCAB,
                options: Mapping[str, Mapping[str, Any]] | None = None, mode: str | None = None,
                distilling: bool = True) -> list[Pass]:
    """The model calls of one pre-training step (`mvptr.objectives.step.PretrainStep`) of `objectives`, for
    `shape.batch` pairs, in the order the step makes them. `mode`: SemVLP's stream mode of the step.
    `distilling`: whether the distillation weight is above 0 (SIMLA ramps it from 0 at step 0, where MLM and
    XMM skip the momentum model's passes)."""
    arch = architecture(cfg, vocab)
    d, b, n = arch.d, shape.batch, shape.text
    options = options if options is not None else cfg["pretrain"]["objectives"]
    passes: list[Pass] = []
    teacher = False

    def add(name: str, flops: Flops, count: float = b, factor: int = 3) -> None:
        if flops.total > 0 and count > 0:
            passes.append(Pass(name, flops, count, factor))

    def add_fusion(name: str, n_text: int, count: float = b, reads: str = "text", factor: int = 3) -> None:
        flops = arch.fuse(n_text, shape, mode=mode)
        unread = arch.unread(n_text, shape, reads, mode) if factor == 3 else ZERO
        add(name, flops - unread, count, factor)
        add(f"{name}: the unread stream's last layer (no gradient)", unread, count, 1)

    def add_teacher() -> None:  # StepContext.teacher: the momentum model's pair encoding, once per step
        nonlocal teacher
        if not teacher:
            teacher = True
            add("momentum: text encoder", arch.text(n), factor=1)
            add("momentum: image encoder", arch.image(shape), factor=1)
            add("momentum: region projection", arch.region_projection(shape), factor=1)

    if any(_uses_pairs(o) for o in objectives):  # PairEncoding: each encoder once, shared by the objectives
        text_grad = bool(_READ_PAIR_CLS.intersection(objectives)) or (
            arch.text_feeds_fusion and bool(_READ_PAIR_TOKENS.intersection(objectives)))
        image_grad = bool(_READ_PAIR_IMAGE.intersection(objectives))
        add("text encoder", arch.text(n), factor=3 if text_grad else 1)
        add("image encoder", arch.image(shape), factor=3 if image_grad else 1)
        add("region projection", arch.region_projection(shape), factor=2 if image_grad else 1)
    if any(o in ("itm", "wpg") for o in objectives):  # PairEncoding.fused, cached
        add_fusion("fusion of the matched pairs (ITM, WPG)", n, reads="both" if "wpg" in objectives else "text")
    for name in objectives:
        opts = options[name]
        if name == "itc":
            add_teacher()
        elif name == "itm":
            negatives = 2 * b if opts.get("negatives") == "both" else b
            add_fusion(f"fusion of ITM's {negatives} negatives", n, count=negatives)
        elif name == "mlm":
            words = opts["mask_prob"] * shape.words
            add("MLM: masked text encoder", arch.text(n), factor=3 if arch.text_feeds_fusion else 1)
            add_fusion("MLM: fusion", n)
            add("MLM: LM head at the masked words", d.vocab_head(words))
            if opts.get("distill", 0) > 0 and distilling:
                add_teacher()
                add("momentum MLM: text encoder", arch.text(n), factor=1)
                add_fusion("momentum MLM: fusion", n, factor=1)
                add("momentum MLM: LM head", d.vocab_head(words), factor=1)
        elif name == "mcr":
            add("MCR: image encoder (masked tags)", arch.image(shape))
            add("MCR: region projection", arch.region_projection(shape), factor=2)
            add("MCR: LM head at the masked tags", d.vocab_head(opts["mask_prob"] * max(shape.tags - 2, 0)))
            if opts.get("text"):
                add("MCR: text encoder (masked concepts)", arch.text(n))
                add("MCR: LM head at the masked concepts", d.vocab_head(opts["mask_prob"] * shape.concepts))
        elif name in ("xmm", "mop"):
            masked = expected_masked_regions(shape.regions, opts["mask_prob"])
            target = opts["target"]
            head = ZERO
            if target in ("tag", "both"):
                head = head + dense(masked, d.hidden, d.vocab)
            if target in ("feature", "both"):
                head = head + dense(masked, d.hidden, d.feature_dim)
            add(f"{name.upper()}: region projection (masked)", arch.region_projection(shape), factor=2)
            add(f"{name.upper()}: image encoder (masked)", arch.image(shape))
            if name == "xmm":
                add("XMM: image tokens through the shared stack", arch.reconstruct(shape))
            else:
                add_fusion("MOP: fusion", n, reads="regions")
            add(f"{name.upper()}: heads at the masked regions", head)
            if name == "xmm" and opts.get("distill", 0) > 0 and target != "feature" and distilling:
                add("momentum XMM: region projection", arch.region_projection(shape), factor=1)
                add("momentum XMM: image encoder", arch.image(shape), factor=1)
                add("momentum XMM: image tokens through the shared stack", arch.reconstruct(shape), factor=1)
                add("momentum XMM: tag head", dense(masked, d.hidden, d.vocab), factor=1)
        elif name == "psl":
            add_teacher()
            add("momentum PSL: [CLS] attention", arch.cls_attention(shape), factor=1)
            add("momentum PSL: keyword head", dense(1, d.projection, d.vocab), factor=1)
            add("PSL: keyword head", dense(1, d.projection, d.vocab))
        elif name == "qa":
            # Every pair taken to carry a question (an upper bound: only those of VQA training images do).
            add_fusion("QA: fusion of the questions", 2 + shape.words)
        # vsc, wpg: the pair encoding and the matched fusion only (counted above)
    return passes


def total(passes: Sequence[Pass]) -> Flops:
    out = ZERO
    for p in passes:
        out = out + p.step_flops
    return out


def task_passes(cfg: Mapping[str, Any], task: str, shape: Shape, vocab: int = DEFAULT_VOCAB) -> list[Pass]:
    """The model calls of one fine-tuning step of a downstream task (mvptr.evaluate.finetune), in the method's
    downstream mode; the task heads (MLPs on the pooled vector) are left out."""
    if task == "retrieval":
        options = retrieval_options(cfg)
        return step_passes(cfg, list(options), shape, vocab=vocab, options=options,
                           mode=cfg["method"].get("downstream_mode"))
    arch = architecture(cfg, vocab)
    n, b = shape.text, shape.batch
    layers = cfg["evaluate"]["rec"]["layer"] if task == "rec" else None
    images = 2 if task == "nlvr2" else 1  # NLVR2: one text encoding, the text fused with each image
    fusion = arch.fuse(n, shape, layers)
    # REC reads the regions and the text [CLS]; the others the pooled text.
    unread = ZERO if layers else arch.unread(n, shape, "text")
    passes = [Pass("text encoder", arch.text(n), b, 3 if arch.text_feeds_fusion else 1),
              Pass("image encoder", arch.image(shape), images * b),
              Pass("region projection", arch.region_projection(shape), images * b, 2),
              Pass("fusion" + (f" (first {layers} layers)" if layers else ""), fusion - unread, images * b),
              Pass("fusion: the unread stream's last layer (no gradient)", unread, images * b, 1)]
    return [p for p in passes if p.flops.total > 0]


def retrieval_options(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The objectives retrieval fine-tunes with: the method's contrastive and ITM objectives at weight 1
    (as `mvptr.evaluate.finetune.retrieval_objectives`; the negatives' sampling does not change the FLOPs)."""
    return {name: {**opts, "weight": 1.0} for name, opts in cfg["pretrain"]["objectives"].items()
            if head_name(name) in ("contrastive", "itm")}


def stage_objectives(cfg: Mapping[str, Any], stage: int) -> list[str]:
    """mvptr.train.stages' answer, imported only when asked: it imports torch (4 s), which an estimate from a
    given step time never needs."""
    from mvptr.train.stages import stage_objectives as objectives_of

    return objectives_of(cfg, stage)


# --- Shapes, modes and GPUs from the config ----------------------------------------------------------------


def stage_shape(cfg: Mapping[str, Any], stage: int) -> Shape:
    pcfg = cfg["pretrain"]
    return Shape(pcfg[f"stage{stage}"]["batch_size"], pcfg["max_words"], pcfg["max_concepts"], pcfg["max_tags"],
                 cfg["regions"]["max_regions"])


def task_shape(cfg: Mapping[str, Any], task: str) -> Shape:
    pcfg = cfg["pretrain"]
    return Shape(cfg["evaluate"][task]["batch_size"], pcfg["max_words"], pcfg["max_concepts"], pcfg["max_tags"],
                 cfg["regions"]["max_regions"])


def mode_steps(cfg: Mapping[str, Any], steps: int) -> dict[str | None, int]:
    """How many of a stage's `steps` run in each mode: SemVLP's iterative schedule (`stream_mode`: each cycle
    mode_ratio[0] blocks single-stream, mode_ratio[1] blocks two-stream, mode_block steps each); else one mode."""
    method = cfg["method"]
    if method["name"] != "semvlp":
        return {None: steps}
    single, two = method.get("mode_ratio", [1, 1])
    block = method.get("mode_block", 1)
    cycle = block * (single + two)
    full, rest = divmod(steps, cycle)
    n_single = full * single * block + min(rest, single * block)
    return {mode: count for mode, count in (("single", n_single), ("two", steps - n_single)) if count}


def first_step_mode(cfg: Mapping[str, Any]) -> str | None:
    """The mode of step 0 (what bench_step and `measure_step` time: they call the step with step=0)."""
    return next(iter(mode_steps(cfg, 1)))


def rule_gpus(cfg: Mapping[str, Any], rule: str) -> int:
    """GPUs the rule's job asks for (its launch settings: launch.rules.<rule> over launch), nodes x
    gpus_per_node; 0 (a CPU job) counts as one device."""
    from mvptr.launch.launcher import LaunchSettings

    settings = LaunchSettings.from_config(cfg["launch"], rule)
    return max(1, settings.nodes * settings.gpus_per_node)


def tokens_per_step(arch: Architecture, shape: Shape, images: int = 1) -> int:
    return shape.batch * (shape.text + images * arch.image_slots(shape))


