"""Image-caption pairs as model tensors: MVPTR's multi-level inputs for pre-training and evaluation.

Why: every objective (`mvptr.objectives`) reads one batch layout (documented there). This module builds it from
the workflow's artifacts, once, in one place: the prepared dataset (captions, splits), the parsed concepts
(`mvptr concepts extract`), the concept vocabulary (`mvptr concepts vocab`) and the region stores
(`mvptr regions extract`).

    text   [CLS] caption word pieces (<= max_words) concepts (<= max_concepts) [SEP]
           a concept is linked to the word pieces whose characters overlap the words it was parsed from
           (`concept_links`), so that masking a word also masks its concepts
    image  [CLS] tag word pieces [SEP] (<= max_tags slots; the regions' object tags in store order, each
           as its word pieces) and the regions (features + 6 box values, <= max_regions), each with its own
           tag as one word piece (`region_tags`, the first piece of the tag's name: SIMLA's XMM target)

Captions are tokenised once when the dataset is built; regions are read from the store per item (an O(1)
lookup). Batches are padded to their longest member.

Use:
    inputs = PairInputs.from_artifacts(cfg, dataset_dir, concepts_file, vocab_file)
    pairs = PairDataset(inputs, region_store_path, split="train")
    batch = collate([pairs[i] for i in range(8)])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mvptr.concepts.parser import SceneGraph
from mvptr.concepts.vocab import concept_ids
from mvptr.questions import QuestionBank, collate_questions
from mvptr.regions.store import RegionStore


@dataclass(frozen=True)
class EncodedText:
    """One caption as model inputs (no padding)."""

    input_ids: np.ndarray  # (L,) int64
    concept_mask: np.ndarray  # (L,) bool
    concept_links: np.ndarray  # (L, L) bool, [c, w]: concept c was parsed from word piece w


class TextEncoder:
    """Caption + its scene graph -> `[CLS] words concepts [SEP]` with the word -> concept map."""

    def __init__(self, tokenizer: Any, vocab: Mapping[str, Any], max_words: int, max_concepts: int) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.max_words = max_words
        self.max_concepts = max_concepts

    def encode_many(self, texts: Sequence[str], graphs: Sequence[Mapping[str, Any] | None]) -> list[EncodedText]:
        """Tokenise all captions in one call of the fast tokenizer, then add each caption's concepts."""
        tokens = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=self.max_words,
                                return_offsets_mapping=True)
        return [self._assemble(ids, offsets, graph)
                for ids, offsets, graph in zip(tokens["input_ids"], tokens["offset_mapping"], graphs, strict=True)]

    def _assemble(self, word_ids: list[int], offsets: list[tuple[int, int]],
                  graph: Mapping[str, Any] | None) -> EncodedText:
        concepts = concept_ids(SceneGraph.from_json(graph), self.vocab)[: self.max_concepts] if graph else []
        tok = self.tokenizer
        ids = [tok.cls_token_id, *word_ids, *(cid for cid, _ in concepts), tok.sep_token_id]
        length = len(ids)
        concept_mask = np.zeros(length, dtype=bool)
        links = np.zeros((length, length), dtype=bool)
        first_concept = 1 + len(word_ids)
        for k, (_, spans) in enumerate(concepts):
            position = first_concept + k
            concept_mask[position] = True
            for w, (start, end) in enumerate(offsets):
                if any(start < span_end and span_start < end for span_start, span_end in spans):
                    links[position, 1 + w] = True
        return EncodedText(np.asarray(ids, dtype=np.int64), concept_mask, links)


class TagEncoder:
    """A region store's tag ids -> `[CLS] tag word pieces [SEP]` (at most `max_tags` slots in all)."""

    def __init__(self, tokenizer: Any, tag_vocab: Sequence[str], max_tags: int) -> None:
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        # A name the tokenizer turns into nothing (a lone space, say) is [UNK].
        self.pieces = [tokenizer(name, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
                       for name in tag_vocab]
        self.max_tags = max_tags

    def encode(self, tags: np.ndarray) -> np.ndarray:
        budget = max(0, self.max_tags - 2)
        ids = [piece for tag in tags.tolist() for piece in self.pieces[tag]][:budget]
        return np.asarray([self.cls, *ids, self.sep], dtype=np.int64)

    def first_pieces(self, tags: np.ndarray) -> np.ndarray:
        """(R,) each region's tag as one word piece: the first piece of its name."""
        return np.asarray([self.pieces[tag][0] for tag in tags.tolist()], dtype=np.int64)


@dataclass
class PairInputs:
    """What every split's pairs share: encoded captions by caption id, and the split of each image."""

    texts: dict[int, EncodedText]
    caption_images: dict[int, int]  # caption id -> image id
    splits: dict[int, str]  # image id -> split
    tokenizer: Any
    max_tags: int
    max_regions: int
    vocab_size: int  # rows of the shared embedding table (tokenizer + new concept rows)

    @classmethod
    def from_artifacts(cls, cfg: Mapping[str, Any], dataset_dir: Path | str, concepts_file: Path | str,
                       vocab_file: Path | str) -> PairInputs:
        from mvptr.concepts.commands import check_extracted_from, dataset_captions, read_concepts
        from mvptr.data.coco import open_prepared, read_json
        from mvptr.text import load_tokenizer

        pcfg = cfg["pretrain"]
        ds = open_prepared(dataset_dir)
        concepts = read_concepts(Path(concepts_file))
        check_extracted_from(concepts, Path(concepts_file), ds, Path(dataset_dir))
        vocab = read_json(vocab_file)
        tokenizer = load_tokenizer(cfg["model"]["tokenizer"])
        captions = dataset_captions(ds)
        encoder = TextEncoder(tokenizer, vocab, pcfg["max_words"], pcfg["max_concepts"])
        encoded = encoder.encode_many([text for _, _, text in captions], [concepts[str(cid)] for cid, _, _ in captions])
        return cls(texts={cid: enc for (cid, _, _), enc in zip(captions, encoded, strict=True)},
                   caption_images={cid: image_id for cid, image_id, _ in captions}, splits=dict(ds.splits),
                   tokenizer=tokenizer, max_tags=pcfg["max_tags"], max_regions=cfg["regions"]["max_regions"],
                   vocab_size=int(vocab["embedding_rows"]))


class PairDataset(Dataset):
    """The (caption, image) pairs of one split, every caption of every image with regions in the store."""

    def __init__(self, inputs: PairInputs, store_path: Path | str, split: str,
                 questions: QuestionBank | None = None) -> None:
        self.inputs = inputs
        # SemVLP's QA objective: each pair also carries a VQA training question about its image.
        self.questions = questions
        self.store = RegionStore(store_path)
        self.tags = TagEncoder(inputs.tokenizer, self.store.tag_vocab, inputs.max_tags)
        # Images missing from the store were skipped as unreadable (regions.on_bad_image: skip).
        self.pairs = [(cid, image_id) for cid, image_id in sorted(inputs.caption_images.items())
                      if inputs.splits[image_id] == split and image_id in self.store]
        if not self.pairs:
            raise ValueError(f"split {split!r} has no captioned image in region store {store_path}")
        self.image_ids = sorted({image_id for _, image_id in self.pairs})

    def __len__(self) -> int:
        return len(self.pairs)

    def image_item(self, image_id: int) -> dict[str, Any]:
        regions = self.store.get(image_id)
        keep = self.inputs.max_regions
        return {"image_id": image_id, "tag_ids": self.tags.encode(regions.tags[:keep]),
                "region_tags": self.tags.first_pieces(regions.tags[:keep]),
                "region_feats": np.asarray(regions.features[:keep]),
                "region_boxes": np.asarray(regions.boxes[:keep], dtype=np.float32)}

    def text_item(self, caption_id: int) -> dict[str, Any]:
        text = self.inputs.texts[caption_id]
        return {"caption_id": caption_id, "input_ids": text.input_ids, "concept_mask": text.concept_mask,
                "concept_links": text.concept_links}

    def __getitem__(self, index: int) -> dict[str, Any]:
        caption_id, image_id = self.pairs[index]
        item = {**self.text_item(caption_id), **self.image_item(image_id)}
        if self.questions is not None:
            item.update(self.questions.item(index, image_id))
        return item


def _pad(rows: Sequence[np.ndarray], value: float = 0) -> tuple[Tensor, Tensor]:
    """Stack 1-D or N-D arrays padded along their first axis; returns (padded, mask of real rows)."""
    length = max(len(r) for r in rows)
    out = np.full((len(rows), length, *rows[0].shape[1:]), value, dtype=rows[0].dtype)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return torch.from_numpy(out), torch.from_numpy(mask)


def _pad_square(rows: Sequence[np.ndarray]) -> Tensor:
    length = max(len(r) for r in rows)
    out = np.zeros((len(rows), length, length), dtype=bool)
    for i, row in enumerate(rows):
        out[i, : len(row), : len(row)] = row
    return torch.from_numpy(out)


def collate_text(items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    input_ids, attention_mask = _pad([it["input_ids"] for it in items])
    concept_mask, _ = _pad([it["concept_mask"] for it in items], False)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "concept_mask": concept_mask,
            "concept_links": _pad_square([it["concept_links"] for it in items]),
            "caption_ids": torch.tensor([it["caption_id"] for it in items], dtype=torch.long)}


def collate_image(items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    tag_ids, tag_mask = _pad([it["tag_ids"] for it in items])
    # An image without regions still gets one (zero, masked) slot: a batch needs a region axis.
    feats = [it["region_feats"] if len(it["region_feats"]) else np.zeros((1, it["region_feats"].shape[1]),
                                                                            np.float16) for it in items]
    region_feats, region_mask = _pad(feats)
    for i, it in enumerate(items):
        region_mask[i, len(it["region_feats"]):] = 0
    boxes = [b if len(b) else np.zeros((1, 6), np.float32) for b in (it["region_boxes"] for it in items)]
    region_boxes, _ = _pad(boxes)
    region_tags, _ = _pad([t if len(t) else np.zeros(1, np.int64) for t in (it["region_tags"] for it in items)])
    return {"tag_ids": tag_ids, "tag_mask": tag_mask, "region_feats": region_feats, "region_boxes": region_boxes,
            "region_mask": region_mask, "region_tags": region_tags, "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.long)}


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Items of PairDataset -> the batch layout of `mvptr.objectives` (+ the question keys of
    `mvptr.questions` when the items carry questions)."""
    batch = {**collate_text(items), **collate_image(items)}
    if "question_ids" in items[0]:
        batch.update(collate_questions(items))
    return batch
