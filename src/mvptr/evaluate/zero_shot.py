"""Zero-shot retrieval after pre-training: rank every (image, caption) pair of a split by the cosine of the
model's contrastive embeddings (VSC, ITC), no fine-tuning, no re-ranking.

Why: the quickest check that stage two aligned the modalities; the issue asks for R@1 against chance.
Chance R@K: text retrieval (image -> its captions among T texts) ~ 1 - C(T - c, K) / C(T, K) with c captions
per image; image retrieval (text -> its image among I images) = K / I.

Use: `metrics = zero_shot_retrieval(cfg, artifacts, weights, split="test")` (weights: a stage's safetensors)
"""

from __future__ import annotations

from collections.abc import Mapping
from math import comb
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from mvptr.artifacts import Artifacts
from mvptr.evaluate.encode import encode_split
from mvptr.evaluate.metrics import retrieval_recalls
from mvptr.pairs import PairDataset, PairInputs


def chance_recalls(text_to_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Expected R@K (%) of a random ranking, same keys as `retrieval_recalls`."""
    num_texts, num_images = len(text_to_image), int(text_to_image.max()) + 1
    per_image = torch.bincount(text_to_image, minlength=num_images).tolist()
    out = {f"tr_r_at_{k}": 100.0 * sum(1 - comb(num_texts - c, k) / comb(num_texts, k) for c in per_image)
           / num_images for k in ks}
    out.update({f"ir_r_at_{k}": 100.0 * min(k, num_images) / num_images for k in ks})
    out["r_sum"] = sum(out.values())
    return out


def zero_shot_retrieval(cfg: Mapping[str, Any], paths: Artifacts, weights: Path,
                        split: str = "test") -> dict[str, Any] | None:
    """Zero-shot recalls of the weights on `split`; None for a model without contrastive embeddings (SemVLP)."""
    from mvptr.models import build_model

    inputs = PairInputs.from_artifacts(cfg, paths.dataset, paths.concepts, paths.vocab)
    pairs = PairDataset(inputs, Path(paths.regions) / f"{split}.h5", split)
    model = build_model(cfg, inputs.vocab_size, pairs.store.feature_dim)
    if not model.has_contrastive:
        return None
    load_model(model, str(weights))
    enc = encode_split(model, pairs, torch.device("cpu"))
    return {"split": split, "images": len(enc.image_ids), "texts": len(enc.caption_ids),
            "recalls": retrieval_recalls(enc.similarity(), enc.text_to_image),
            "chance": chance_recalls(enc.text_to_image)}
