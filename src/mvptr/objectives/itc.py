"""ITC, image-text contrastive learning with a momentum queue and momentum distillation (SIMLA, after ALBEF).

Why: like MVPTR's VSC it aligns the text [CLS] and the image vector, but contrasts each pair with many more
negatives than a batch holds - a queue of the momentum model's embeddings of earlier batches - and softens the
one-hot targets with the momentum model's own similarities, which tolerates captions that fit other images.

Per METHODS.md (SIMLA): with the model's normalised embeddings t_i, v_i and the momentum model's t'_i, v'_i,
the candidates are the batch's momentum embeddings followed by the queue (Q entries):
    s_i2t = v_i . [t'_1..B ; queue_text] / temperature       s_t2i = t_i . [v'_1..B ; queue_image] / temperature
    target = alpha * softmax(momentum similarities) + (1 - alpha) * positives / #positives
    loss   = (CE(s_i2t, target_i2t) + CE(s_t2i, target_t2i)) / 2        (soft cross-entropies, batch mean)
alpha = `distill` x the ramp (`StepContext.ramp`, 0 -> 1 over method.distill_ramp_steps, as ALBEF's first
epoch). Positives: every candidate of the same image (the queue keeps each entry's image id), so a duplicate
is never a negative; `allow_duplicates: true` takes the diagonal only, as the released code. Empty queue slots
(the queue starts empty) are left out. After the loss, the batch's momentum embeddings are enqueued (gathered
from every rank first, so every rank keeps the same queue), replacing the oldest.

State (buffers, saved in the checkpoint with the step module): text_queue, image_queue (Q, P), id_queue (Q,)
(-1 = empty), ptr (1,): the next slot to write.

Options (`pretrain.objectives.itc`): weight, queue_size (SIMLA 65,536), distill (SIMLA 0.4), allow_duplicates.

Use: `loss, logs = ITC(options, model.config)(model, batch, encoded, ctx)` (ctx.momentum: the momentum model)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext, distill_weight
from mvptr.objectives.heads import ContrastiveHead

if TYPE_CHECKING:
    from mvptr.models.base import VLConfig, VLModel


def gather(x: Tensor) -> Tensor:
    """Every rank's `x` concatenated in rank order (no gradient); `x` outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def soft_cross_entropy(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets[i, j] log softmax(logits[i])_j over the `valid` (B, N) columns."""
    log_probs = F.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=1).masked_fill(~valid, 0.0)
    return -(targets * log_probs).sum(dim=1).mean()


def contrastive_targets(positives: Tensor, momentum_logits: Tensor, valid: Tensor, alpha: float) -> Tensor:
    """alpha * softmax(momentum logits over the valid columns) + (1 - alpha) * positives / #positives."""
    hard = positives.float() / positives.float().sum(dim=1, keepdim=True).clamp(min=1.0)
    if alpha == 0:
        return hard
    soft = F.softmax(momentum_logits.masked_fill(~valid, float("-inf")), dim=1)
    return alpha * soft + (1 - alpha) * hard


class ITC(Objective):
    name = "itc"
    head_name = "contrastive"
    uses_momentum = True
    options_schema = {
        "queue_size": {"type": "integer", "minimum": 0,
                       "description": "momentum embeddings kept from earlier batches (SIMLA 65536; 0 = none)"},
        "distill": distill_weight("weight of the momentum similarities in the targets (SIMLA 0.4)"),
        "allow_duplicates": {"type": "boolean", "description": "only the matched pair is a positive (released "
                                                               "code), not every pair of the same image"},
    }
    head = staticmethod(ContrastiveHead)

    def __init__(self, options: Mapping[str, Any], config: VLConfig) -> None:
        super().__init__(options, config)
        size, dim = int(options["queue_size"]), config.embedding_dim
        self.register_buffer("text_queue", torch.zeros(size, dim))
        self.register_buffer("image_queue", torch.zeros(size, dim))
        self.register_buffer("id_queue", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, text: Tensor, image: Tensor, image_ids: Tensor) -> None:
        """Write the (global) batch's momentum embeddings over the oldest entries; the pointer moves on."""
        size = self.id_queue.shape[0]
        if size == 0:
            return
        text, image, image_ids = gather(text)[-size:], gather(image)[-size:], gather(image_ids)[-size:]
        slots = (self.ptr + torch.arange(text.shape[0], device=self.ptr.device)) % size
        self.text_queue[slots] = text.to(self.text_queue.dtype)
        self.image_queue[slots] = image.to(self.image_queue.dtype)
        self.id_queue[slots] = image_ids.to(self.id_queue.device)
        self.ptr.copy_((self.ptr + text.shape[0]) % size)

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        if encoded is None:
            encoded = PairEncoding(model, batch)
        head = model.heads["contrastive"]
        head.clamp_temperature()
        temperature = head.temperature
        text, image = model.contrastive_embeddings(encoded.text, encoded.image)
        image_ids = batch["image_ids"]
        with torch.no_grad():
            teacher = ctx.teacher(batch)
            text_m, image_m = ctx.momentum.contrastive_embeddings(teacher.text, teacher.image)
            all_text = torch.cat([text_m, self.text_queue.to(text_m.dtype)])
            all_image = torch.cat([image_m, self.image_queue.to(image_m.dtype)])
            all_ids = torch.cat([image_ids, self.id_queue])
            valid = torch.cat([torch.ones_like(image_ids, dtype=torch.bool), self.id_queue >= 0])[None, :]
            if self.options["allow_duplicates"]:
                positives = torch.zeros(image_ids.shape[0], all_ids.shape[0], dtype=torch.bool, device=text.device)
                positives[:, : image_ids.shape[0]] = torch.eye(image_ids.shape[0], dtype=torch.bool,
                                                              device=text.device)
            else:
                positives = image_ids[:, None] == all_ids[None, :]
            alpha = self.options["distill"] * ctx.ramp
            target_i2t = contrastive_targets(positives, image_m @ all_text.T / temperature, valid, alpha)
            target_t2i = contrastive_targets(positives, text_m @ all_image.T / temperature, valid, alpha)
        loss_i2t = soft_cross_entropy(image @ all_text.T / temperature, target_i2t, valid)
        loss_t2i = soft_cross_entropy(text @ all_image.T / temperature, target_t2i, valid)
        loss = (loss_i2t + loss_t2i) / 2
        self.enqueue(text_m, image_m, image_ids)
        return loss, {"itc": loss.detach(), "temperature": temperature.detach(),
                      "itc_queue_filled": (self.id_queue >= 0).float().sum()}


OBJECTIVE = ITC
