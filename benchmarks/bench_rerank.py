"""Seconds and pairs per second of retrieval scoring: ITM re-ranking of the VSC top-k vs ITM on every pair.

Why: retrieval evaluation ranks every image-text pair by VSC similarity and runs the cross-modal encoder only
on the top k_text texts of each image and the top k_image images of each text (`mvptr.evaluate.rerank`):
k_text * n_images + k_image * n_texts forwards instead of n_images * n_texts. This measures what that buys on
the tiny model (configs/models/tiny.yaml: hidden 128, 2+2+2 layers, 2 heads, intermediate 256; random
weights, eval mode) at 1,000 images x 5,000 texts (text length 40, 10 regions, 10 tags), with the uni-modal
encodings computed once and shared by both ways (their time is reported apart, as `encode_seconds`).

Exhaustive scoring of all 5M pairs takes far longer than re-ranking on a small CPU. When the re-ranking rate
predicts more than `--max-exhaustive-seconds` for it, the exhaustive scorer is timed on `--exhaustive-pairs`
random pairs and its time extrapolated linearly (per-pair cost does not depend on which pairs: every text and
every image has the same length); the JSON says so (`exhaustive_extrapolated`, `exhaustive_measured_pairs`).

The model is built through the method interface (`mvptr.models.base`): any method's model works, and the
uni-modal outputs are cached in a `mvptr.evaluate.encode.SplitEncoding`, as the evaluation does.

Run: `.venv/bin/python benchmarks/bench_rerank.py [--method mvptr] [--k-text 16] [--k-image 16] [--threads 2]
[--batch-size 512]`. Writes `results/benchmarks/rerank.json` (another method: `rerank_<method>.json`;
atomically) and prints the same numbers. A smoke run: `--images 8 --texts 40 --k-text 4 --k-image 4 --out
/tmp/rerank.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mvptr.atomic import atomic_write_json
from mvptr.config import load_config, project_root
from mvptr.evaluate.encode import SplitEncoding
from mvptr.evaluate.rerank import exhaustive_scores, itm_pair_scorer, rerank, score_pairs
from mvptr.models import model_class
from mvptr.models.base import VLModel
from mvptr.regions.boxes import NUM_BOX_VALUES

# The tiny model of configs/models/tiny.yaml on BERT's uncased vocabulary plus room for concept rows.
TINY = dict(vocab_size=30522 + 200, region_feature_dim=128, hidden_size=128, num_text_layers=2, num_visual_layers=2,
            num_cross_layers=2, num_attention_heads=2, intermediate_size=256)
CLS, SEP = 101, 102


def random_inputs(n_images: int, n_texts: int, text_length: int, num_regions: int, num_tags: int,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Word pieces between [CLS] and [SEP] (no padding), tags likewise, random region features and boxes."""
    def tokens(n: int, length: int) -> torch.Tensor:
        ids = torch.randint(1000, 30000, (n, length), generator=generator)
        ids[:, 0], ids[:, -1] = CLS, SEP
        return ids

    corners = torch.rand(n_images, num_regions, 2, 2, generator=generator).sort(dim=2).values  # x1 <= x2, y1 <= y2
    x1, x2, y1, y2 = corners[..., 0, 0], corners[..., 1, 0], corners[..., 0, 1], corners[..., 1, 1]
    boxes = torch.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], dim=-1)
    assert boxes.shape[-1] == NUM_BOX_VALUES
    return {"input_ids": tokens(n_texts, text_length), "attention_mask": torch.ones(n_texts, text_length),
            "tag_ids": tokens(n_images, num_tags + 2), "tag_mask": torch.ones(n_images, num_tags + 2),
            "region_feats": torch.randn(n_images, num_regions, TINY["region_feature_dim"], generator=generator),
            "region_boxes": boxes, "region_mask": torch.ones(n_images, num_regions)}


IMAGE_KEYS = ("tag_ids", "tag_mask", "region_feats", "region_boxes", "region_mask")


def build_model(method: str) -> VLModel:
    """The TINY model of `method`, with its method options and the heads of its objectives (config layer
    configs/methods/<method>.yaml), built without the tokenizer (random ids need none)."""
    import dataclasses

    cfg = load_config([f"method.name={method}"])
    cls = model_class(method)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    options = {k: v for k, v in cfg["method"].items() if k in fields and k not in TINY}
    return cls(cls.config_class(**TINY, **options, objectives=list(cfg["pretrain"]["objectives"])))


@torch.no_grad()
def encode(model: VLModel, inputs: dict[str, torch.Tensor], batch_size: int, device: torch.device) -> SplitEncoding:
    """Uni-modal outputs of every text and image, once, through the model interface (`encode_text`,
    `encode_image`, the contrastive embeddings), on `device`; `.similarity()` is their (n_images, n_texts)
    contrastive similarity."""
    def batches(n: int) -> list[slice]:
        return [slice(start, start + batch_size) for start in range(0, n, batch_size)]

    on = {key: value.to(device) for key, value in inputs.items()}
    n_texts, n_images = len(on["input_ids"]), len(on["tag_ids"])
    texts = [model.encode_text(on["input_ids"][s], on["attention_mask"][s]) for s in batches(n_texts)]
    images = [model.encode_image({key: on[key][s] for key in IMAGE_KEYS}) for s in batches(n_images)]
    return SplitEncoding(
        image_ids=list(range(n_images)), caption_ids=list(range(n_texts)),
        text_to_image=torch.arange(n_texts, device=device) % n_images,  # random data: a nominal ground truth
        text_hidden=torch.cat([text.tokens for text in texts]).float(), text_mask=on["attention_mask"],
        image_cls=torch.cat([image.cls for image in images]).float(),
        region_hidden=torch.cat([image.regions for image in images]).float(), region_mask=on["region_mask"],
        text_emb=torch.cat([model.text_embedding(text) for text in texts]).float(),
        image_emb=torch.cat([model.image_embedding(image) for image in images]).float())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="mvptr", help="a method of configs/methods/ (mvptr, simla)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--k-text", type=int, default=16, help="texts re-scored per image")
    parser.add_argument("--k-image", type=int, default=16, help="images re-scored per text")
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--regions", type=int, default=10)
    parser.add_argument("--tags", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512, help="pairs per cross-modal forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-exhaustive-seconds", type=float, default=600.0,
                        help="above this predicted time, time a random subset of pairs and extrapolate")
    parser.add_argument("--exhaustive-pairs", type=int, default=200_000, help="size of that subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON to write (default results/benchmarks/rerank.json, rerank_<method>.json for "
                             "another method)")
    args = parser.parse_args()
    name = "rerank.json" if args.method == "mvptr" else f"rerank_{args.method}.json"
    out = args.out or project_root() / "results" / "benchmarks" / name

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    model = build_model(args.method).eval().to(device)
    inputs = random_inputs(args.images, args.texts, args.text_length, args.regions, args.tags, generator)

    start = time.perf_counter()
    encoded = encode(model, inputs, args.batch_size, device)
    similarity = encoded.similarity()
    synchronize(device)
    encode_seconds = time.perf_counter() - start
    scorer = itm_pair_scorer(model, encoded)
    # Warm-up: the first forwards pay one-off costs (allocations, kernel selection) that neither way should.
    warm = torch.arange(min(args.batch_size, args.images), device=device)
    score_pairs(warm, warm, scorer, args.batch_size)
    synchronize(device)

    start = time.perf_counter()
    result = rerank(similarity, args.k_text, args.k_image, scorer, args.batch_size)
    synchronize(device)
    rerank_seconds = time.perf_counter() - start

    total_pairs = args.images * args.texts
    predicted = total_pairs * rerank_seconds / result.pairs_scored
    extrapolated = predicted > args.max_exhaustive_seconds
    start = time.perf_counter()
    if extrapolated:
        flat = torch.randperm(total_pairs, generator=generator)[: args.exhaustive_pairs].to(device)
        score_pairs(flat // args.texts, flat % args.texts, scorer, args.batch_size)
        measured_pairs = flat.numel()
    else:
        exhaustive_scores(args.images, args.texts, scorer, args.batch_size, device=device)
        measured_pairs = total_pairs
    synchronize(device)
    measured_seconds = time.perf_counter() - start
    exhaustive_seconds = measured_seconds * total_pairs / measured_pairs

    report: dict[str, Any] = {
        "device": str(device), "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "method": args.method, "model": TINY, "images": args.images, "texts": args.texts,
        "text_length": args.text_length, "regions": args.regions, "tags": args.tags, "batch_size": args.batch_size,
        "seed": args.seed,
        "encode_seconds": round(encode_seconds, 3),
        "k_text": args.k_text, "k_image": args.k_image,
        "rerank_pairs": result.pairs_scored, "rerank_seconds": round(rerank_seconds, 3),
        "rerank_pairs_per_s": round(result.pairs_scored / rerank_seconds, 1),
        "exhaustive_pairs": total_pairs, "exhaustive_seconds": round(exhaustive_seconds, 3),
        "exhaustive_pairs_per_s": round(measured_pairs / measured_seconds, 1),
        "exhaustive_measured_pairs": measured_pairs, "exhaustive_measured_seconds": round(measured_seconds, 3),
        "exhaustive_extrapolated": extrapolated,
        "pair_ratio": round(total_pairs / result.pairs_scored, 2),
        "speedup": round(exhaustive_seconds / rerank_seconds, 2),
    }
    atomic_write_json(out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
