"""The uni-modal encodings of a split, computed once: every caption and every image of it.

Why: retrieval scores every (image, text) pair. Encoding each text and each image once and caching the
outputs - the [CLS] projections for VSC, the full hidden states for the ITM re-ranking - turns the cost of
exhaustive scoring into k·(images + texts) cross-modal passes (`mvptr.evaluate.rerank`).

Use:
    enc = encode_split(model, pairs, device=torch.device("cpu"))
    similarity = enc.image_emb @ enc.text_emb.T            # (images, texts) VSC cosine
    text_to_image = enc.text_to_image                      # (texts,) index of each caption's image
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mvptr.data.pairs import PairDataset, collate_image, collate_text
from mvptr.models.mvptr import MVPTRModel


@dataclass
class SplitEncoding:
    image_ids: list[int]
    caption_ids: list[int]
    text_to_image: Tensor  # (T,) long
    text_hidden: Tensor  # (T, L, H) text-encoder outputs
    text_mask: Tensor  # (T, L)
    region_hidden: Tensor  # (I, R, H) visual-encoder outputs at the regions
    region_mask: Tensor  # (I, R)
    text_emb: Tensor  # (T, P) L2-normalised VSC projections of the text [CLS]
    image_emb: Tensor  # (I, P) L2-normalised VSC projections of the visual [CLS]

    def similarity(self) -> Tensor:
        """(I, T) VSC cosine similarities."""
        return self.image_emb @ self.text_emb.T


def _cat_padded(chunks: list[Tensor]) -> Tensor:
    """Concatenate (n, l, ...) chunks along n, zero-padding l to the longest."""
    length = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, [0, 0] * (c.dim() - 2) + [0, length - c.shape[1]]) for c in chunks])


@torch.no_grad()
def encode_split(model: MVPTRModel, pairs: PairDataset, device: torch.device, batch_size: int = 128) -> SplitEncoding:
    model.eval()
    caption_ids = [cid for cid, _ in pairs.pairs]
    image_ids = pairs.image_ids
    image_index = {image_id: i for i, image_id in enumerate(image_ids)}
    text_hidden, text_mask, text_emb = [], [], []
    for start in range(0, len(caption_ids), batch_size):
        batch = collate_text([pairs.text_item(c) for c in caption_ids[start:start + batch_size]])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = model.encode_text(ids, mask)
        text_hidden.append(hidden.float().cpu())
        text_mask.append(mask.cpu())
        text_emb.append(F.normalize(model.text_proj(hidden[:, 0]).float(), dim=-1).cpu())
    region_hidden, region_mask, image_emb = [], [], []
    for start in range(0, len(image_ids), batch_size):
        batch = {k: v.to(device) for k, v in collate_image([pairs.image_item(i) for i in
                                                            image_ids[start:start + batch_size]]).items()}
        image = model.encode_image(batch["tag_ids"], batch["tag_mask"], batch["region_feats"],
                                   batch["region_boxes"], batch["region_mask"])
        region_hidden.append(image.regions.float().cpu())
        region_mask.append(batch["region_mask"].cpu())
        image_emb.append(F.normalize(model.visual_proj(image.tags[:, 0]).float(), dim=-1).cpu())
    return SplitEncoding(
        image_ids=image_ids, caption_ids=caption_ids,
        text_to_image=torch.tensor([image_index[image_id] for _, image_id in pairs.pairs], dtype=torch.long),
        text_hidden=_cat_padded(text_hidden), text_mask=_cat_padded(text_mask),
        region_hidden=_cat_padded(region_hidden), region_mask=_cat_padded(region_mask),
        text_emb=torch.cat(text_emb), image_emb=torch.cat(image_emb))
