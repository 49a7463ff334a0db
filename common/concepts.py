"""Concepts, their tokens, and layer-wise prompt encoding.

A concept ``<dog1>`` trained with ED-LoRA is written in prompts as two words,
``<dog1_1> <dog1_2>``; each word has one token PER cross-attention layer
(``<dog1_1_l0>`` ... ``<dog1_1_l{L-1}>``) in the tokenizer and the embedding matrix.
Vanilla LoRA (the paper's baseline) has one word and one token, shared by every layer.
An imported LoRA (``mos-import``) is a ``trigger`` concept: ``<name>`` stands for its trigger
words, ordinary words of the tokenizer (``"sks dog"``), and it adds no token at all.

``encode_prompts`` turns prompts into ``[batch, L, tokens, dim]``: copy ``l`` is the prompt
with every concept word replaced by its layer-``l`` token; ``encode_text`` also returns
SDXL's pooled embedding (``mos.common.text``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .text import TextEncoders

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
METHODS = ("edlora", "lora", "trigger")


class ConceptError(ValueError):
    """A concept name, token or class word is not usable; the message says why."""


def parse_concept_name(text: str) -> str:
    """``'<Dog1>'`` or ``'dog1'`` -> ``'dog1'``; letters, digits, ``_`` and ``-`` only.

    Names are case-insensitive and kept in lower case: CLIP's tokenizer lowercases prompts
    (and the tokens added to it), so ``<Dog1>`` and ``<dog1>`` could never be told apart.
    """
    raw = text.strip()
    name = raw[1:-1] if raw.startswith("<") and raw.endswith(">") else raw
    if not NAME_RE.match(name):
        raise ConceptError(
            f"concept name {text!r} is not allowed: use 1-64 letters, digits, '_' or '-' "
            "(optionally in angle brackets, e.g. '<dog1>')"
        )
    return name.lower()


@dataclass(frozen=True)
class Concept:
    """A concept's names. ``num_layers`` is L for ED-LoRA and 1 for vanilla LoRA.

    ``trigger``: for ``method="trigger"`` (an imported LoRA), the words ``<name>`` stands for.
    """

    name: str
    class_word: str
    method: str = "edlora"
    num_layers: int = 1
    trigger: str = ""

    def __post_init__(self) -> None:
        if parse_concept_name(self.name) != self.name:
            raise ConceptError(f"concept name {self.name!r} must be lower case")
        if self.method not in METHODS:
            raise ConceptError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.num_layers < 1:
            raise ConceptError("a concept needs at least one layer")
        if self.method == "trigger":
            if not self.trigger.strip():
                raise ConceptError(
                    f"imported concept <{self.name}> needs its trigger words (e.g. 'sks dog')"
                )
            if re.search(r"[<>]", self.trigger):
                raise ConceptError(
                    f"trigger words {self.trigger!r} of <{self.name}> may not contain '<' or '>'"
                )
            if self.num_layers != 1:
                raise ConceptError("an imported (trigger-word) concept has one layer")
        elif self.trigger:
            raise ConceptError(f"only imported concepts have trigger words, not {self.method}")

    def to_dict(self) -> dict:
        """The concept as ``concepts.json`` lists it (``from_dict`` reads it back)."""
        out = {
            "token": self.token,
            "name": self.name,
            "class_word": self.class_word,
            "method": self.method,
            "num_layers": self.num_layers,
            "words": self.words,
            "tokens": self.all_tokens(),
        }
        if self.trigger:
            out["trigger"] = self.trigger
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Concept:
        return cls(
            d["name"], d["class_word"], d["method"], int(d["num_layers"]), d.get("trigger", "")
        )

    @property
    def token(self) -> str:
        """How users write the concept in prompts: ``<dog1>``."""
        return f"<{self.name}>"

    @property
    def words(self) -> list[str]:
        """``['<dog1_1>', '<dog1_2>']`` for ED-LoRA; ``['<dog1>']`` for vanilla LoRA; none for
        an imported (trigger-word) concept."""
        if self.method == "trigger":
            return []
        if self.method == "lora":
            return [self.token]
        return [f"<{self.name}_1>", f"<{self.name}_2>"]

    @property
    def layerwise(self) -> bool:
        return self.method == "edlora"

    def layer_token(self, word: int, layer: int) -> str:
        """The tokenizer token of word ``word`` at cross-attention layer ``layer``."""
        if not self.layerwise:
            return self.words[word]
        return f"<{self.name}_{word + 1}_l{layer}>"

    def all_tokens(self) -> list[str]:
        """Every token this concept adds, word-major: ``[w0 l0, w0 l1, ..., w1 l0, ...]``."""
        n_layers = self.num_layers if self.layerwise else 1
        return [self.layer_token(w, i) for w in range(len(self.words)) for i in range(n_layers)]

    def phrase(self) -> str:
        """The concept's words as they stand in a prompt: ``'<dog1_1> <dog1_2>'`` (an imported
        concept: its trigger words)."""
        if self.method == "trigger":
            return self.trigger
        return " ".join(self.words)


class ConceptTable:
    """The concepts a model knows, with prompt expansion to per-layer token strings."""

    def __init__(self, concepts: Iterable[Concept] = ()) -> None:
        self._concepts: dict[str, Concept] = {}
        for c in concepts:
            self.add(c)

    def add(self, concept: Concept) -> None:
        if concept.name in self._concepts:
            raise ConceptError(f"concept {concept.token} is already in the model")
        names = {concept.token, *concept.words}
        for other in self:
            clash = names & {other.token, *other.words}
            if clash:
                raise ConceptError(
                    f"concept {concept.token} clashes with {other.token} (both use {sorted(clash)[0]})"
                )
        self._concepts[concept.name] = concept

    def __iter__(self):
        return iter(self._concepts.values())

    def __len__(self) -> int:
        return len(self._concepts)

    def __contains__(self, name: str) -> bool:
        return name in self._concepts

    def known_tokens(self) -> list[str]:
        return [c.token for c in self]

    def expand(self, prompt: str, num_layers: int) -> list[str]:
        """The prompt's ``num_layers`` per-layer strings.

        ``<dog1>`` stands for the concept's words; ED-LoRA words become their layer tokens.
        An angle-bracket word the table does not know is an error naming the known ones.
        """
        text = prompt
        for c in self:
            if c.layerwise or c.method == "trigger":
                text = _replace(text, c.token, c.phrase())
        for match in re.findall(r"<[^<>\s]+>", text):
            if not any(match.lower() in c.words for c in self):
                known = ", ".join(self.known_tokens()) or "none"
                raise ConceptError(f"unknown concept token {match} in prompt; known: {known}")
        layered = []
        for layer in range(num_layers):
            s = text
            for c in self:
                if c.layerwise:
                    for w, word in enumerate(c.words):
                        s = _replace(s, word, c.layer_token(w, layer))
            layered.append(s)
        return layered


def _replace(text: str, token: str, new: str) -> str:
    """Replace ``token`` in ``text`` ignoring case (CLIP lowercases prompts anyway)."""
    return re.sub(re.escape(token), lambda _: new, text, flags=re.IGNORECASE)


def prompt_token_ids(
    tokenizer, prompts: Sequence[str], concepts: ConceptTable, num_layers: int
) -> tuple[torch.Tensor, bool]:
    """The ids ``encode_prompts`` feeds the text encoder, and whether they are per layer.

    ``[len(prompts) * num_layers, tokens]`` (copy ``l`` of prompt ``p`` at row
    ``p * num_layers + l``), or ``[len(prompts), tokens]`` when no prompt has layer-wise
    concepts (each is encoded once and broadcast to every layer).
    """
    per_layer = [concepts.expand(p, num_layers) for p in prompts]
    if all(len(set(copies)) == 1 for copies in per_layer):
        return tokenize(tokenizer, [copies[0] for copies in per_layer]), False
    return tokenize(tokenizer, [s for copies in per_layer for s in copies]), True


def encode_text(
    text: TextEncoders,
    prompts: Sequence[str],
    concepts: ConceptTable,
    num_layers: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([batch, num_layers, tokens, dim], pooled [batch, pooled_dim] or None)``: copy ``l``
    of the text encoding for cross-attention layer ``l``, and for SDXL the pooled embedding.

    Prompts without layer-wise concepts are encoded once and broadcast to every layer. A
    prompt with layer-wise concepts has one pooled embedding per layer copy; the UNet takes
    one per image, their mean (docs/method.md, SDXL).
    """
    ids, layerwise = prompt_token_ids(text.tokenizer, prompts, concepts, num_layers)
    hidden, pooled = text(ids)
    if not layerwise:
        return hidden.unsqueeze(1).expand(-1, num_layers, -1, -1), pooled
    hidden = hidden.view(len(prompts), num_layers, *hidden.shape[1:])
    if pooled is not None:
        pooled = pooled.view(len(prompts), num_layers, -1).mean(dim=1)
    return hidden, pooled


def encode_prompts(
    text: TextEncoders,
    prompts: Sequence[str],
    concepts: ConceptTable,
    num_layers: int,
) -> torch.Tensor:
    """``[batch, num_layers, tokens, dim]`` text encodings, copy ``l`` for layer ``l``
    (``encode_text`` without the pooled embedding)."""
    return encode_text(text, prompts, concepts, num_layers)[0]


def concept_token_ids(tokenizer, concept: Concept) -> list[int]:
    """The ids that stand for ``concept`` in an encoded prompt: its own tokens, or for an
    imported concept the ids of its trigger words."""
    if concept.method == "trigger":
        return list(tokenizer(concept.trigger, add_special_tokens=False).input_ids)
    return list(tokenizer.convert_tokens_to_ids(concept.all_tokens()))


def through_end_token(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Boolean mask of the unpadded prompt: every position up to its first end token."""
    is_eos = ids == eos_id
    before = is_eos.cumsum(dim=1) - is_eos.long() == 0  # no end token strictly before
    return before


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """CLIP input ids, padded/truncated to the tokenizer's max length (77 for SD)."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
