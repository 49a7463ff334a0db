"""Concept tokens in the tokenizer and the text encoder's embedding matrix.

``add_concept_tokens`` appends a concept's tokens (2 words x L layers for ED-LoRA) to the
tokenizer and grows the embedding matrix; ``TrainableRows`` swaps the embedding module for
one whose new rows are a separate parameter, so during training no other row can change
(the reference restores the other rows after each step; here they never move at all).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    added = base.tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ConceptError(f"could not add all tokens of {concept.token} to the tokenizer")
    with torch.random.fork_rng(devices=[]):  # resizing draws random rows; keep global RNG as is
        base.text_encoder.resize_token_embeddings(len(base.tokenizer), mean_resizing=False)
    ids = list(base.tokenizer.convert_tokens_to_ids(tokens))
    first_new = len(base.tokenizer) - len(tokens)
    if len(set(ids)) != len(ids) or min(ids) < first_new:
        raise ConceptError(f"the tokenizer did not give {concept.token} fresh token ids")
    return ids


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
    Vanilla LoRA: its one word starts at the class word's embedding.
    """
    weight = base.text_encoder.get_input_embeddings().weight
    cls = weight[class_word_id(base, concept.class_word)].detach().float().cpu()
    layers = concept.num_layers if concept.layerwise else 1
    emb = cls.expand(len(concept.words), layers, -1).clone()
    if concept.layerwise:
        emb[0] = torch.randn(layers, emb.shape[-1], generator=generator) * FIRST_WORD_INIT_STD
    return emb


def write_embeddings(base: BaseModel, concept: Concept, embeddings: torch.Tensor) -> None:
    """Put ``[words, layers, dim]`` into the embedding rows of the concept's tokens."""
    if not concept.all_tokens():
        return
    weight = base.text_encoder.get_input_embeddings().weight
    ids = base.tokenizer.convert_tokens_to_ids(concept.all_tokens())
    with torch.no_grad():
        weight[ids] = embeddings.reshape(len(ids), -1).to(weight.device, weight.dtype)


class TrainableRows(nn.Module):
    """An embedding whose rows ``ids`` come from the trainable ``rows`` parameter."""

    ids: torch.Tensor
    lookup: torch.Tensor

    def __init__(self, embedding: nn.Embedding, ids: list[int]) -> None:
        super().__init__()
        self.embedding = embedding
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        weight = embedding.weight
        self.rows = nn.Parameter(weight[ids].detach().clone().float())
        lookup = torch.full((weight.shape[0],), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup.to(weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what get_input_embeddings().weight users expect
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.embedding(input_ids)
        slot = self.lookup[input_ids]
        is_new = slot >= 0
        if not bool(is_new.any()):
            return out
        new = self.rows[slot.clamp(min=0)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)


@contextlib.contextmanager
def trainable_rows(text_encoder: CLIPTextModel, ids: list[int]) -> Iterator[TrainableRows]:
    """Swap in ``TrainableRows`` for the token embedding; on exit write the rows back."""
    original = text_encoder.get_input_embeddings()
    module = TrainableRows(original, ids)
    text_encoder.set_input_embeddings(module)
    try:
        yield module
    finally:
        text_encoder.set_input_embeddings(original)
        with torch.no_grad():
            original.weight[module.ids] = module.rows.detach().to(original.weight.dtype)
