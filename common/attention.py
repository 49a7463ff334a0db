"""Layer-wise cross-attention for ED-LoRA (docs/method.md, section 1).

``cross_attention_layers(unet)`` fixes THE order of the UNet's cross-attention layers, the
paper's: down blocks, then the mid block, then up blocks. ``unet.attn_processors`` lists
down, up, mid, so never index by that dict. Training, fusion and sampling all use this
function.

A prompt is encoded once per layer (``[batch, L, tokens, dim]``); diffusers passes the 4-D
``encoder_hidden_states`` through the UNet untouched, and ``LayerwiseCrossAttnProcessor``
of layer ``l`` picks copy ``l``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from .regions import combine


def cross_attention_layers(unet: UNet2DConditionModel) -> list[tuple[str, Attention]]:
    """``[(name, attn2 module)]`` in the paper's order: down -> mid -> up."""
    layers: list[tuple[str, Attention]] = []
    blocks: list[tuple[str, nn.Module | None]] = [
        (f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)
    ]
    blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for prefix, block in blocks:
        if block is None:
            continue
        for name, module in block.named_modules():
            if isinstance(module, Attention) and name.endswith("attn2"):
                layers.append((f"{prefix}.{name}", module))
    return layers


class AttentionMapRecorder:
    """Collects cross-attention probabilities per layer while it is attached.

    ``maps[l]`` is ``[batch, query pixels, tokens]`` (mean over heads) of cross-attention
    layer ``l``. Owned by whoever runs the forward pass; nothing global.
    """

    def __init__(self) -> None:
        self.maps: dict[int, torch.Tensor] = {}

    def record(self, layer: int, probs: torch.Tensor) -> None:
        self.maps[layer] = probs

    def clear(self) -> None:
        self.maps.clear()


def layer_context(encoder_hidden_states: torch.Tensor | None, layer: int) -> torch.Tensor:
    """Layer ``layer``'s copy of a 4-D layer-wise encoding (a 3-D one is used as is)."""
    if encoder_hidden_states is None:
        raise ValueError("cross-attention needs encoder_hidden_states")
    if encoder_hidden_states.ndim == 4:
        return encoder_hidden_states[:, layer]
    return encoder_hidden_states


class LayerwiseCrossAttnProcessor:
    """Cross-attention that reads its own layer's copy of a 4-D text encoding.

    ``kv_dropout``: dropout on the text features entering to_k/to_v while training (the
    reference's guard against LoRA weights taking over the concept's identity).
    ``recorder``: when set, attention probabilities are computed explicitly and recorded.
    """

    def __init__(
        self,
        layer: int,
        kv_dropout: float = 0.0,
        recorder: AttentionMapRecorder | None = None,
    ) -> None:
        self.layer = layer
        self.kv_dropout = kv_dropout
        self.recorder = recorder

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        encoder_hidden_states = layer_context(encoder_hidden_states, self.layer)
        if self.kv_dropout > 0 and attn.training:
            encoder_hidden_states = F.dropout(encoder_hidden_states, p=self.kv_dropout)
        return attention_forward(
            attn,
            hidden_states,
            encoder_hidden_states,
            record=((lambda p: self.recorder.record(self.layer, p)) if self.recorder else None),
        )


def attention_forward(
    attn: Attention,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    record=None,
) -> torch.Tensor:
    """Plain SD 1.x attention of ``hidden_states`` over ``context`` (no masks, no norms)."""
    residual = hidden_states
    batch = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(context)
    value = attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = split(query), split(key), split(value)
    if record is None:
        out = F.scaled_dot_product_attention(query, key, value)
    else:
        scores = (query @ key.transpose(-1, -2)) * attn.scale
        probs = scores.softmax(dim=-1)
        record(probs.mean(dim=1))
        out = probs.to(value.dtype) @ value
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


@contextlib.contextmanager
def cross_attention_processors(unet: nn.Module, make: Callable[[int], object]) -> Iterator[list]:
    """Give cross-attention layer ``l`` (paper order) the processor ``make(l)``; restore the
    previous processors on exit, whatever happens."""
    layers = cross_attention_layers(unet)
    saved = [module.processor for _, module in layers]
    processors = [make(i) for i in range(len(layers))]
    try:
        for (_, module), proc in zip(layers, processors, strict=True):
            module.set_processor(proc)
        yield processors
    finally:
        for (_, module), proc in zip(layers, saved, strict=True):
            module.set_processor(proc)


def layerwise_cross_attention(
    unet: nn.Module,
    kv_dropout: float = 0.0,
    recorder: AttentionMapRecorder | None = None,
) -> contextlib.AbstractContextManager[list[LayerwiseCrossAttnProcessor]]:
    """Install layer-wise processors on every cross-attention layer; restore on exit."""
    return cross_attention_processors(
        unet, lambda i: LayerwiseCrossAttnProcessor(i, kv_dropout, recorder)
    )


class RegionalCrossAttnProcessor:
    """Region-aware cross-attention (docs/method.md, section 3) on layer-wise encodings.

    ``encoder_hidden_states`` is ``[batch, L, (1 + R) * tokens, dim]``: the global prompt's
    encoding, then each region prompt's. The global prompt is attended everywhere; each
    region's prompt only by the queries inside its box (computed for those queries alone,
    so a region costs in proportion to its area); ``regions.combine`` merges them.
    ``masks`` maps a feature map's token count to its ``[R, tokens]`` masks.
    """

    def __init__(self, layer: int, masks: dict[int, torch.Tensor], tokens: int) -> None:
        self.layer = layer
        self.masks = masks
        self.tokens = tokens
        self.index = {
            n: [m.nonzero().flatten() for m in mask] for n, mask in masks.items()
        }  # per size, per region: the cells inside the box

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        context = layer_context(encoder_hidden_states, self.layer)
        t = self.tokens
        out = attention_forward(attn, hidden_states, context[:, :t])
        n = hidden_states.shape[1]
        if n not in self.masks:
            raise ValueError(f"no region masks for a feature map of {n} cells")
        masks = self.masks[n].to(hidden_states.device)
        regions = torch.zeros((len(masks), *out.shape), dtype=out.dtype, device=out.device)
        for r, idx in enumerate(self.index[n]):
            if len(idx):
                idx = idx.to(hidden_states.device)
                ctx = context[:, (1 + r) * t : (2 + r) * t]
                regions[r][:, idx] = attention_forward(attn, hidden_states[:, idx], ctx)
        return combine(out, regions, masks)


def regional_cross_attention(
    unet: nn.Module, masks: dict[int, torch.Tensor], tokens: int
) -> contextlib.AbstractContextManager[list[RegionalCrossAttnProcessor]]:
    """Install regional processors on every cross-attention layer; restore on exit."""
    return cross_attention_processors(unet, lambda i: RegionalCrossAttnProcessor(i, masks, tokens))
