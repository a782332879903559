"""Training windows and batches: the examples of an epoch, shuffled, are laid end to end and cut into max_length
windows, collated into padded tensors, and shared out by rank (`Stream`). The examples come from train/data.py.

Packing (`data.packing`): "concat" trains each window as one text. "documents" keeps the examples apart inside a
window: each token attends only to its own example and its positions count from the example's start
(aegis/packing.py). "auto", the default, is "documents" when the data holds a chat or instruction record (separate
conversations) and "concat" for plain text, which reads on across paragraphs as pre-training text does.
"""

from __future__ import annotations

import random

import torch

from aegis.packing import KEY as DOCUMENTS

from .data import IGNORE, DataError, Example


def packing_mode(setting: str, examples: list[Example], tiled_attention: bool = False) -> str:
    """ "documents" or "concat": data.packing, "auto" decided by the data (documents if any record is a chat).
    Not "documents" where the memory plan tiles the attention (aegis/tiled.py): those windows are one long sequence
    each, and a mask of their length squared is what tiling is there to avoid."""
    if setting == "auto":
        return "documents" if any(ex.chat for ex in examples) and not tiled_attention else "concat"
    if setting == "documents" and tiled_attention:
        raise DataError(
            'data.packing = "documents" masks attention across the window, which the tiled attention '
            'of long sequences (train.tiled_attention) does not; set data.packing = "concat" or a '
            "shorter train.max_length"
        )
    return setting


def pack(examples: list[Example], max_length: int, documents: bool = False) -> list[Example]:
    """Concatenate examples (each already ends in EOS) into one stream and cut it into max_length windows.
    No padding is created; only the last window may be shorter. With `documents`, each window also lists the
    document of each token (numbered from 0 within the window; an example cut by a window's end continues as the
    next window's first document), and the first token of each document is not a target: in its own document
    nothing comes before it to predict it from."""
    ids = [t for ex in examples for t in ex.input_ids]
    labels = [t for ex in examples for t in ex.labels]
    owner = [i for i, ex in enumerate(examples) for _ in ex.input_ids] if documents else None
    out = []
    for i in range(0, len(ids), max_length):
        window = Example(ids[i : i + max_length], labels[i : i + max_length])
        if documents:
            own = owner[i : i + max_length]
            window.documents = [own[j] - own[0] for j in range(len(own))]
            window.labels = [IGNORE if j and own[j] != own[j - 1] else t for j, t in enumerate(window.labels)]
        if any(x != IGNORE for x in window.labels[1:]):
            out.append(window)
    return out


def epoch_sequences(
    examples: list[Example], max_length: int, seed: int, epoch: int, documents: bool = False
) -> list[Example]:
    """The packed sequences of one epoch: examples shuffled by (seed, epoch), then packed. Deterministic."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return pack([examples[i] for i in order], max_length, documents)


def collate(batch: list[Example], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded tensors, `width` wide (default: the longest example). Padding is never labelled. Windows that
    keep their documents apart add `documents` ([batch, width]; the padding is a document of its own)."""
    width = width or max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(ex.documents is not None for ex in batch):
        docs = out[DOCUMENTS] = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ex in enumerate(batch):
            own = ex.documents if ex.documents is not None else [0] * len(ex.input_ids)
            docs[row, : len(own)] = torch.tensor(own)
            docs[row, len(own) :] = own[-1] + 1 if own else 0
    return out


class Stream:
    """Global order of packed sequences, consumed a global batch at a time and shared out by rank.

    Position is (epoch, offset) in global sequences, so it does not depend on the number of processes: a run
    resumed on another process count continues at the same place."""

    def __init__(
        self,
        examples: list[Example],
        max_length: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        documents: bool = False,
    ):
        self.examples, self.max_length, self.seed, self.rank, self.world = examples, max_length, seed, rank, world
        self.documents = documents  # keep the examples of a window apart (data.packing = "documents")
        self.epoch, self.offset = 0, 0
        self._seqs = epoch_sequences(examples, max_length, seed, 0, documents)
        if not self._seqs:
            raise DataError(
                f"the data holds no sequence with a token to learn from ({len(examples)} example(s), "
                f"none longer than its end-of-text token)"
            )

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._seqs = epoch_sequences(self.examples, self.max_length, self.seed, self.epoch, self.documents)

    def _take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.offset >= len(self._seqs):
                self.restore({"epoch": self.epoch + 1, "offset": 0})
            out.append(self._seqs[self.offset])
            self.offset += 1
        return out

    def next_update(self, batch_size: int, accum: int) -> list[list[Example]]:
        """This rank's micro-batches for one update: global batch = world x batch_size x accum sequences."""
        glob = self._take(self.world * batch_size * accum)
        return [
            glob[(j * self.world + self.rank) * batch_size : (j * self.world + self.rank + 1) * batch_size]
            for j in range(accum)
        ]
