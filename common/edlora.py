"""Concept tokens in the tokenizer and the text encoder's embedding matrix.

``add_concept_tokens`` appends a concept's tokens (2 words x L layers for ED-LoRA) to the
tokenizer and grows the embedding matrix; ``TrainableRows`` swaps the embedding module for
one whose new rows are a separate parameter, so during training no other row can change
(the reference restores the other rows after each step; here they never move at all).

SDXL: the tokens go into both tokenizers (same ids, the vocabularies being shared) and both
embedding matrices. A concept's embedding row is the first encoder's row followed by the
second's (``[words, layers, d1 + d2]``), one trainable parameter whose slices each encoder
reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import CLIPTextModel

from .base import BaseModel
from .concepts import Concept, ConceptError

FIRST_WORD_INIT_STD = 0.013  # docs/method.md: the first word starts random, sigma 0.013


def add_concept_tokens(base: BaseModel, concept: Concept) -> list[int]:
    """Append the concept's tokens; returns their ids in ``concept.all_tokens()`` order."""
    tokens = concept.all_tokens()
    if not tokens:  # an imported concept's trigger words are the tokenizer's own
        return []
    vocab = base.tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab]
    if taken:
        raise ConceptError(
            f"the model already has token(s) {', '.join(taken[:4])}: concept "
            f"{concept.token} collides with a concept or word it knows"
        )
    pairs = [(base.tokenizer, base.text_encoder)]
    if base.tokenizer_2 is not None and base.text_encoder_2 is not None:
        pairs.append((base.tokenizer_2, base.text_encoder_2))
    ids: list[int] = []
    for tokenizer, encoder in pairs:
        added = tokenizer.add_tokens(tokens)
        if added != len(tokens):
            raise ConceptError(f"could not add all tokens of {concept.token} to the tokenizer")
        with torch.random.fork_rng(devices=[]):  # resizing draws random rows; keep RNG as is
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        these = list(tokenizer.convert_tokens_to_ids(tokens))
        first_new = len(tokenizer) - len(tokens)
        if len(set(these)) != len(these) or min(these) < first_new:
            raise ConceptError(f"the tokenizer did not give {concept.token} fresh token ids")
        if ids and these != ids:
            raise ConceptError(f"the two tokenizers gave {concept.token} different token ids")
        ids = these
    return ids


def embedding_widths(base: BaseModel) -> list[int]:
    """Each text encoder's share of a concept's embedding row (SDXL: two)."""
    return [int(m.config.hidden_size) for m in base.text_encoders()]


def class_word_id(base: BaseModel, class_word: str) -> int:
    """The single token id of ``class_word``; refuses words the tokenizer splits."""
    ids = base.tokenizer(class_word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = base.tokenizer.convert_ids_to_tokens(ids)
        raise ConceptError(
            f"class word {class_word!r} is not a single token of this model's tokenizer "
            f"(it splits into {pieces}); choose a one-token word such as 'dog', 'cat', 'man'"
        )
    return ids[0]


def initial_embeddings(
    base: BaseModel, concept: Concept, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[words, layers, dim]`` start values (docs/method.md, section 1).

    ED-LoRA: word 1 ~ N(0, 0.013^2), word 2 = the class word's embedding, in every layer.
    Vanilla LoRA: its one word starts at the class word's embedding. SDXL: ``dim`` is both
    encoders' rows side by side.
    """
    cid = class_word_id(base, concept.class_word)
    cls = torch.cat(
        [m.get_input_embeddings().weight[cid].detach().float().cpu() for m in base.text_encoders()]
    )
    layers = concept.num_layers if concept.layerwise else 1
    emb = cls.expand(len(concept.words), layers, -1).clone()
    if concept.layerwise:
        emb[0] = torch.randn(layers, emb.shape[-1], generator=generator) * FIRST_WORD_INIT_STD
    return emb


def write_embeddings(base: BaseModel, concept: Concept, embeddings: torch.Tensor) -> None:
    """Put ``[words, layers, dim]`` into the embedding rows of the concept's tokens (SDXL:
    the first encoder's share of ``dim``, then the second's)."""
    if not concept.all_tokens():
        return
    ids = base.tokenizer.convert_tokens_to_ids(concept.all_tokens())
    rows = embeddings.reshape(len(ids), -1)
    start = 0
    for encoder, width in zip(base.text_encoders(), embedding_widths(base), strict=True):
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = rows[:, start : start + width].to(weight.device, weight.dtype)
        start += width


class TrainableRows(nn.Module):
    """An embedding whose rows ``ids`` come from the trainable ``rows`` parameter (or
    columns ``[start, stop)`` of a ``rows`` parameter shared with another encoder)."""

    ids: torch.Tensor
    lookup: torch.Tensor

    def __init__(
        self,
        embedding: nn.Embedding,
        ids: list[int],
        rows: nn.Parameter | None = None,
        columns: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        weight = embedding.weight
        self.rows = rows if rows is not None else nn.Parameter(weight[ids].detach().clone().float())
        self.columns = columns or (0, self.rows.shape[1])
        lookup = torch.full((weight.shape[0],), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup.to(weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what get_input_embeddings().weight users expect
        return self.embedding.weight

    def own_rows(self) -> torch.Tensor:
        start, stop = self.columns
        return self.rows[:, start:stop]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.embedding(input_ids)
        slot = self.lookup[input_ids]
        is_new = slot >= 0
        if not bool(is_new.any()):
            return out
        new = self.own_rows()[slot.clamp(min=0)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)


@contextlib.contextmanager
def trainable_rows(
    text_encoders: CLIPTextModel | Sequence[CLIPTextModel], ids: list[int]
) -> Iterator[TrainableRows]:
    """Swap in ``TrainableRows`` for the token embedding of each text encoder (SDXL: both,
    reading their columns of one parameter); on exit write the rows back. The first
    encoder's module is yielded; its ``rows`` is the parameter to train."""
    encoders: list[CLIPTextModel] = (
        [text_encoders] if isinstance(text_encoders, CLIPTextModel) else list(text_encoders)
    )
    originals = [e.get_input_embeddings() for e in encoders]
    widths = [int(o.weight.shape[1]) for o in originals]
    rows = nn.Parameter(
        torch.cat([o.weight[ids].detach().clone().float() for o in originals], dim=1)
    )
    modules, start = [], 0
    for encoder, original, width in zip(encoders, originals, widths, strict=True):
        module = TrainableRows(original, ids, rows, (start, start + width))
        encoder.set_input_embeddings(module)
        modules.append(module)
        start += width
    try:
        yield modules[0]
    finally:
        for encoder, original, module in zip(encoders, originals, modules, strict=True):
            encoder.set_input_embeddings(original)
            with torch.no_grad():
                original.weight[module.ids] = module.own_rows().detach().to(original.weight.dtype)
