"""VSC, visual-semantic contrastive learning (MVPTR stage two): align the uni-modal [CLS] vectors.

Why: a coarse, global alignment of text and image before the cross-modal encoder; its similarities also
choose ITM's hard negatives and rank candidates for retrieval. Loss: symmetric InfoNCE between the
L2-normalised bias-free projections of the text [CLS] and the visual [CLS] (the model's contrastive head,
`mvptr.objectives.heads.ContrastiveHead`), divided by a learnable temperature (initialised at 0.07 and
clamped in place to `TEMPERATURE_RANGE`, as ALBEF does, so it cannot run away).

Negatives: when torch.distributed is initialised, every rank's embeddings are gathered with their gradient
(`torch.distributed.nn.functional.all_gather`), so each pair is contrasted with the global batch; this
needs the same per-rank batch size. `gather=False` keeps the per-GPU batch only, as the released code did.

Batch keys: input_ids, attention_mask, tag_ids, tag_mask, region_feats, region_boxes, region_mask.

Options (`pretrain.objectives.vsc`): weight, gather.

Use: `loss, logs = vsc_loss(model, batch, encoded)` (encoded: a shared `mvptr.objectives.PairEncoding`, or None)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext
from mvptr.objectives.heads import ContrastiveHead

if TYPE_CHECKING:
    from mvptr.models.base import VLModel


@torch.no_grad()
def similarity(model: VLModel, encoded: PairEncoding) -> Tensor:
    """(B texts, B images) cosine similarities, without gradient (for picking negatives)."""
    text, image = model.contrastive_embeddings(encoded.text, encoded.image)
    return text @ image.T


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Every rank's `x` concatenated in rank order, with gradient flowing back to each rank's own part, and
    the offset of this rank's rows; `(x, 0)` outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather  # imported late: it needs an initialised backend

    return torch.cat(all_gather(x)), dist.get_rank() * x.shape[0]


def info_nce(text: Tensor, image: Tensor, temperature: Tensor | float, gather: bool = True) -> Tensor:
    """Symmetric InfoNCE of matched rows of `text` and `image` (normalised, (B, P)): the mean of the
    text->image and image->text cross-entropies, other pairs of the (global) batch being the negatives."""
    all_text, offset = gather_with_grad(text) if gather else (text, 0)
    all_image, _ = gather_with_grad(image) if gather else (image, 0)
    targets = torch.arange(text.shape[0], device=text.device) + offset
    text_to_image = text @ all_image.T / temperature
    image_to_text = image @ all_text.T / temperature
    return (F.cross_entropy(text_to_image, targets) + F.cross_entropy(image_to_text, targets)) / 2


def vsc_loss(model: VLModel, batch: Batch, encoded: PairEncoding | None = None, *,
             gather: bool = True) -> tuple[Tensor, Logs]:
    """Symmetric InfoNCE over the batch (global batch when `gather` and distributed)."""
    if encoded is None:
        encoded = PairEncoding(model, batch)
    head = model.heads["contrastive"]
    head.clamp_temperature()
    text, image = model.contrastive_embeddings(encoded.text, encoded.image)
    loss = info_nce(text, image, head.temperature, gather)
    return loss, {"vsc": loss.detach(), "temperature": head.temperature.detach()}


class VSC(Objective):
    name = "vsc"
    head_name = "contrastive"
    options_schema = {"gather": {"type": "boolean", "description": "negatives from every rank when distributed "
                                                                    "(false: the per-GPU batch, released code)"}}
    head = staticmethod(ContrastiveHead)

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        return vsc_loss(model, batch, encoded, gather=self.options["gather"])


OBJECTIVE = VSC
