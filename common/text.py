"""The text side of a base: one CLIP text encoder (SD 1.x / 2.x) or two (SDXL).

``TextEncoders`` runs token ids through the base's encoders and returns what the UNet
reads: the hidden states ``[batch, tokens, dim]`` for cross-attention and, for SDXL, the
pooled embedding ``[batch, pooled_dim]`` that joins the added time ids
(``added_conditions``).

SD 1.x / 2.x: the text encoder's last hidden state, as ``StableDiffusionPipeline``.
SDXL, as ``StableDiffusionXLPipeline``: both encoders' penultimate hidden states,
concatenated along the feature axis (CLIP ViT-L 768 + OpenCLIP bigG 1280 = 2048 for the
standard model), and the second encoder's projected end-token state as the pooled
embedding. The two tokenizers of an SDXL base share their vocabulary (they differ in the
padding token only), so concept tokens take the same ids in both and one row of ids serves
both encoders: positions after the end token are re-padded with the second tokenizer's pad
id. The pooled embedding is read at the first end token (CLIP's own pooling in transformers
takes the largest id when ``eos_token_id`` is 2, which a concept token's id would win).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SDXL = "sdxl"


@dataclass
class TextEncoders:
    """A base's tokenizer(s) and text encoder(s); ``tokenizer_2`` / ``text_encoder_2`` are
    set for SDXL only."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def dim(self) -> int:
        """Width of the hidden states the UNet's cross-attention reads."""
        return sum(int(m.config.hidden_size) for m in self.encoders())

    def encoders(self) -> Iterator[CLIPTextModel | CLIPTextModelWithProjection]:
        yield self.text_encoder
        if self.text_encoder_2 is not None:
            yield self.text_encoder_2

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def second_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (first tokenizer) as the second tokenizer pads them."""
        assert self.tokenizer_2 is not None
        pad = self.tokenizer_2.pad_token_id
        after = after_end_token(ids, int(self.tokenizer.eos_token_id))
        return torch.where(after, torch.full_like(ids, pad), ids)

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden [N, T, dim], pooled [N, pooled_dim] or None)`` for ids ``[N, T]``."""
        ids = ids.to(self.device)
        if self.text_encoder_2 is None:
            return self.text_encoder(ids)[0], None
        first = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out = self.text_encoder_2(self.second_ids(ids), output_hidden_states=True)
        second = out.hidden_states[-2]
        end = first_end_token(ids, int(self.tokenizer.eos_token_id))
        last = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), end]
        pooled = self.text_encoder_2.text_projection(last.to(self.text_encoder_2.dtype))
        return torch.cat([first, second.to(first.dtype)], dim=-1), pooled


def first_end_token(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of each row's first end token (the last position where a row has none)."""
    is_eos = ids == eos_id
    found = is_eos.any(dim=1)
    first = is_eos.int().argmax(dim=1)
    return torch.where(found, first, torch.full_like(first, ids.shape[1] - 1))


def after_end_token(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Boolean mask of the positions strictly after each row's first end token."""
    is_eos = (ids == eos_id).long()
    return (is_eos.cumsum(dim=1) - is_eos) > 0


def time_ids(height: int, width: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    """SDXL's size conditioning ``[batch, 6]``: original size, crop corner (0, 0), target
    size, all ``(height, width)`` in pixels (an uncropped image made at the size asked)."""
    row = torch.tensor([height, width, 0, 0, height, width], dtype=like.dtype)
    return row.to(like.device).expand(batch, -1)


def added_conditions(
    pooled: torch.Tensor | None, height: int, width: int
) -> dict[str, dict[str, torch.Tensor]]:
    """The UNet keyword ``added_cond_kwargs`` for SDXL (empty without a pooled embedding)."""
    if pooled is None:
        return {}
    ids = time_ids(height, width, pooled.shape[0], pooled)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
