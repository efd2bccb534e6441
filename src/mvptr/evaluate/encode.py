"""The uni-modal encodings of a split, computed once: every caption and every image of it.

Why: retrieval scores every (image, text) pair. Encoding each text and each image once and caching the
outputs - the contrastive embeddings (VSC, ITC), the full hidden states for the ITM re-ranking - turns the
cost of exhaustive scoring into k·(images + texts) cross-modal passes (`mvptr.evaluate.rerank`). Any method's
model works: only the interface of `mvptr.models.base` is used.

Use:
    enc = encode_split(model, pairs, device=torch.device("cpu"))
    similarity = enc.similarity()                          # (images, texts) contrastive cosine
    image = enc.images(torch.tensor([0, 3]))               # an ImageEncoding of cached images, for model.fuse
    text_to_image = enc.text_to_image                      # (texts,) index of each caption's image
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mvptr.models.base import ImageEncoding, VLModel
from mvptr.pairs import PairDataset, collate_image, collate_text


@dataclass
class SplitEncoding:
    image_ids: list[int]
    caption_ids: list[int]
    text_to_image: Tensor  # (T,) long
    text_hidden: Tensor  # (T, L, H) the texts' token states the fusion starts from (`TextEncoding.tokens`)
    text_mask: Tensor  # (T, L)
    image_cls: Tensor  # (I, H) the image encoder's global vector
    region_hidden: Tensor  # (I, R, H) image-encoder outputs at the regions
    region_mask: Tensor  # (I, R)
    text_emb: Tensor | None  # (T, P) L2-normalised contrastive embeddings of the texts (None: the model has none)
    image_emb: Tensor | None  # (I, P) L2-normalised contrastive embeddings of the images
    tag_hidden: Tensor | None = None  # (I, T, H) the image side's tag states, for a fusion that reads them
    tag_mask: Tensor | None = None  # (I, T)

    def similarity(self) -> Tensor:
        """(I, T) contrastive cosine similarities."""
        if self.text_emb is None or self.image_emb is None:
            raise ValueError("the model has no contrastive embeddings (SemVLP): rank pairs by ITM instead")
        return self.image_emb @ self.text_emb.T

    def images(self, index: Tensor) -> ImageEncoding:
        """The cached encodings of the images `index`, as `model.fuse` takes them."""
        tags = None if self.tag_hidden is None else self.tag_hidden[index]
        tag_mask = None if self.tag_mask is None else self.tag_mask[index].bool()
        return ImageEncoding(cls=self.image_cls[index], regions=self.region_hidden[index],
                             region_mask=self.region_mask[index].bool(), tags=tags, tag_mask=tag_mask)

    def to(self, device: torch.device) -> SplitEncoding:
        return SplitEncoding(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()})


def _cat_padded(chunks: list[Tensor]) -> Tensor:
    """Concatenate (n, l, ...) chunks along n, zero-padding l to the longest."""
    length = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, [0, 0] * (c.dim() - 2) + [0, length - c.shape[1]]) for c in chunks])


@torch.no_grad()
def encode_split(model: VLModel, pairs: PairDataset, device: torch.device, batch_size: int = 128) -> SplitEncoding:
    model.eval()
    contrastive = model.has_contrastive
    caption_ids = [cid for cid, _ in pairs.pairs]
    image_ids = pairs.image_ids
    image_index = {image_id: i for i, image_id in enumerate(image_ids)}
    text_hidden, text_mask, text_emb = [], [], []
    for start in range(0, len(caption_ids), batch_size):
        batch = collate_text([pairs.text_item(c) for c in caption_ids[start:start + batch_size]])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        text = model.encode_text(ids, mask)
        text_hidden.append(text.tokens.float().cpu())
        text_mask.append(mask.cpu())
        if contrastive:
            text_emb.append(model.text_embedding(text).cpu())
    image_cls, region_hidden, region_mask, image_emb, tag_hidden, tag_mask = [], [], [], [], [], []
    for start in range(0, len(image_ids), batch_size):
        batch = {k: v.to(device) for k, v in collate_image([pairs.image_item(i) for i in
                                                            image_ids[start:start + batch_size]]).items()}
        image = model.encode_image(batch)
        image_cls.append(image.cls.float().cpu())
        region_hidden.append(image.regions.float().cpu())
        region_mask.append(batch["region_mask"].cpu())
        if image.tag_mask is not None:  # a fusion that reads the tags (SemVLP with use_tags)
            tag_hidden.append(image.tags.float().cpu())
            tag_mask.append(image.tag_mask.long().cpu())
        if contrastive:
            image_emb.append(model.image_embedding(image).cpu())
    return SplitEncoding(
        image_ids=image_ids, caption_ids=caption_ids,
        text_to_image=torch.tensor([image_index[image_id] for _, image_id in pairs.pairs], dtype=torch.long),
        text_hidden=_cat_padded(text_hidden), text_mask=_cat_padded(text_mask), image_cls=torch.cat(image_cls),
        region_hidden=_cat_padded(region_hidden), region_mask=_cat_padded(region_mask),
        text_emb=torch.cat(text_emb) if contrastive else None, image_emb=torch.cat(image_emb) if contrastive else None,
        tag_hidden=_cat_padded(tag_hidden) if tag_hidden else None, tag_mask=_cat_padded(tag_mask) if tag_mask else None)
