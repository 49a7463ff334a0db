"""LoRA as a plain module: ``y = W x + b + scale * B(A(dropout(x)))``.

docs/method.md, section 1: rank 4, scale 1.0 (not alpha/rank), ``A`` ("down") kaiming-uniform,
``B`` ("up") zero, so an injected adapter is a no-op until it is trained.

``LoRALinear`` *is* an ``nn.Linear`` that shares the original ``weight``/``bias``
parameters and adds ``lora_A``/``lora_B`` children. The parent module's state-dict keys for
the base weights therefore do not change, and the adapter keys follow the PEFT / diffusers
naming: ``<module path>.lora_A.weight`` ``[rank, in]`` and ``<module path>.lora_B.weight``
``[out, rank]``. With diffusers' ``load_lora_weights`` (alpha defaults to rank) the same
tensors give the same scale-1 update.

``LoRAConv2d`` does the same for a convolution (LoCon; not in the paper, which adapts the
attention linears only): ``lora_A`` is a convolution with the base's kernel, stride and
padding to ``rank`` channels, ``lora_B`` a 1x1 convolution back, PEFT's layout
(``[rank, in, kh, kw]`` and ``[out, rank, 1, 1]``). Seen as a linear map on im2col patches
(``patches``) it is ``B A`` with ``A`` ``[rank, in * kh * kw]``, so gradient fusion solves it
like any linear layer; ``set_factors`` and ``set_batched`` take those flattened factors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_CONV_TARGETS = ("conv1", "conv2")  # the 3x3 convolutions of the UNet's ResNet blocks
# LoCon adapts the ResNet convolutions of the up (decoder) blocks only. The down blocks'
# convolutions see mostly the noisy latent, the same for every concept, so their concept
# updates collide in gradient fusion: on the toy world, adapting them too drew no better
# alone and fused five concepts with 2.5x the loss (benchmarks/RESULTS.md).
UNET_CONV_BLOCKS = "up_blocks."


class _LowRank:
    """What ``LoRALinear`` and ``LoRAConv2d`` share: the adapter seen as the flattened factors
    ``up`` ``[out, R]`` @ ``down`` ``[R, in_features]``, switchable between models."""

    in_features: int
    out_features: int
    weight: torch.Tensor
    lora_A: nn.Linear | nn.Conv2d
    lora_B: nn.Linear | nn.Conv2d
    lora_dropout: nn.Module
    scale: float
    batched: tuple[torch.Tensor, torch.Tensor] | None

    def _adapter_pair(
        self, rank: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[nn.Linear | nn.Conv2d, nn.Linear | nn.Conv2d]:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        return int(self.lora_A.weight.shape[0])

    def _init_adapter(self, rank: int, dropout: float) -> None:
        if rank < 1 or rank > min(self.in_features, self.out_features):
            raise ValueError(f"LoRA rank {rank} is out of range for a {self._describe()}")
        self.lora_A, self.lora_B = self._adapter_pair(rank, self.weight.device, self.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = 1.0
        # per-sample-group adapters (fusion samples several concept models in one batch)
        self.batched = None

    def set_batched(self, ups: list[torch.Tensor], downs: list[torch.Tensor]) -> None:
        """One adapter per equal chunk of the batch: chunk ``k`` gets ``ups[k] @ downs[k]``.

        Ranks may differ (they are zero-padded). The batch must hold the K groups one after
        the other, in equal numbers of rows. ``set_factors`` switches this off.
        """
        r = max(d.shape[0] for d in downs)
        dev = self.weight.device
        u = torch.zeros(len(ups), self.out_features, r, device=dev)
        d = torch.zeros(len(downs), r, self.in_features, device=dev)
        for i, (up, down) in enumerate(zip(ups, downs, strict=True)):
            u[i, :, : up.shape[1]] = up
            d[i, : down.shape[0]] = down
        self.batched = (u, d)

    def set_factors(self, up: torch.Tensor | None, down: torch.Tensor | None) -> None:
        """Make the adapter ``up @ down`` (any rank), or switch it off with ``None``."""
        self.batched = None
        if up is None or down is None:
            self.scale = 0.0
            return
        if (
            up.shape[0] != self.out_features
            or down.shape[1] != self.in_features
            or up.shape[1] != down.shape[0]
        ):
            raise ValueError(
                f"factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit a {self._describe()}"
            )
        if self.rank != down.shape[0]:
            dev, dt = self.weight.device, self.lora_A.weight.dtype
            self.lora_A, self.lora_B = self._adapter_pair(down.shape[0], dev, dt)
            self.lora_A.requires_grad_(False)
            self.lora_B.requires_grad_(False)
        with torch.no_grad():
            self.lora_A.weight.copy_(down.reshape(self.lora_A.weight.shape))
            self.lora_B.weight.copy_(up.reshape(self.lora_B.weight.shape))
        self.scale = 1.0

    def delta_matrix(self) -> torch.Tensor:
        """``scale * B @ A`` as ``[out, in_features]``."""
        up = self.lora_B.weight.reshape(self.out_features, -1)
        return self.scale * (up @ self.lora_A.weight.reshape(self.rank, -1))


class LoRALinear(_LowRank, nn.Linear):
    """A linear layer with a low-rank adapter beside it (see module docstring)."""

    def __init__(self, base: nn.Linear, rank: int = 4, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self._init_adapter(rank, dropout)

    def _adapter_pair(
        self, rank: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[nn.Linear | nn.Conv2d, nn.Linear | nn.Conv2d]:
        a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        return a, b

    def _describe(self) -> str:
        return f"{self.in_features}->{self.out_features} layer"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.batched is not None:
            ups, downs = self.batched  # [K, out, r], [K, r, in]: batch chunk k uses adapter k
            k = ups.shape[0]
            xs = x.reshape(k, -1, x.shape[-1]).to(downs.dtype)
            lora = (xs @ downs.transpose(1, 2)) @ ups.transpose(1, 2)
            return out + lora.reshape(out.shape).to(out.dtype)
        if self.scale == 0.0:
            return out
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + self.scale * lora.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A``, the update this adapter adds to ``weight``."""
        return self.delta_matrix()

    def to_linear(self, merge: bool = False) -> nn.Linear:
        """A plain ``nn.Linear`` with the same base parameters (merged with the update if asked)."""
        # built on the meta device: no throw-away initialisation, then given our parameters
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        lin.weight = self.weight
        lin.bias = self.bias
        if merge:
            with torch.no_grad():
                lin.weight.add_(self.delta_weight().to(lin.weight.dtype))
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, rank={self.rank}, scale={self.scale}"


class LoRAConv2d(_LowRank, nn.Conv2d):
    """A convolution with a low-rank adapter beside it (LoCon; see module docstring)."""

    def __init__(self, base: nn.Conv2d, rank: int = 4, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(
                "LoRA on convolutions needs groups=1, zero padding given as numbers; this one "
                f"has groups={base.groups}, padding={base.padding!r}, mode={base.padding_mode}"
            )
        for attr in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "transposed", "output_padding", "groups", "padding_mode",
        ):  # fmt: skip
            setattr(self, attr, getattr(base, attr))
        self._reversed_padding_repeated_twice = base._reversed_padding_repeated_twice
        self.weight = base.weight
        self.bias = base.bias
        kh, kw = base.kernel_size
        self.in_features = base.in_channels * kh * kw  # as a linear map on im2col patches
        self.out_features = base.out_channels
        self._init_adapter(rank, dropout)

    def _adapter_pair(
        self, rank: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[nn.Linear | nn.Conv2d, nn.Linear | nn.Conv2d]:
        a = nn.Conv2d(
            self.in_channels, rank, self._kernel, self._stride, self._padding, self._dilation,
            bias=False, device=device, dtype=dtype,
        )  # fmt: skip
        b = nn.Conv2d(rank, self.out_channels, 1, bias=False, device=device, dtype=dtype)
        return a, b

    # nn.Conv2d's attributes as its constructor takes them (torch types them loosely)
    @property
    def _kernel(self) -> tuple[int, int]:
        return cast(tuple[int, int], self.kernel_size)

    @property
    def _stride(self) -> tuple[int, int]:
        return cast(tuple[int, int], self.stride)

    @property
    def _padding(self) -> str | tuple[int, int]:
        return cast("str | tuple[int, int]", self.padding)

    @property
    def _dilation(self) -> tuple[int, int]:
        return cast(tuple[int, int], self.dilation)

    def _describe(self) -> str:
        kh, kw = self.kernel_size
        return f"{self.in_channels}->{self.out_channels} {kh}x{kw} convolution"

    def _down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        w = down.reshape(down.shape[0], self.in_channels, *self.kernel_size)
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        if self.batched is not None:
            ups, downs = self.batched  # [K, out, r], [K, r, in*kh*kw]: chunk k uses adapter k
            chunks = x.to(downs.dtype).chunk(ups.shape[0])
            lora = torch.cat(
                [
                    torch.einsum("or,brhw->bohw", up, self._down(xc, down))
                    for xc, up, down in zip(chunks, ups, downs, strict=True)
                ]
            )
            return out + lora.to(out.dtype)
        if self.scale == 0.0:
            return out
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + self.scale * lora.to(out.dtype)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, positions, in * kh * kw]``: the im2col inputs the layer multiplies, in
        the order of ``weight.reshape(out, -1)``; ``conv(x) = patches(x) @ W^T`` (+ bias)."""
        cols = F.unfold(
            x, self._kernel, self._dilation, cast(tuple[int, int], self.padding), self._stride
        )
        return cols.transpose(1, 2)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in the base weight's shape ``[out, in, kh, kw]``."""
        return self.delta_matrix().reshape(self.weight.shape)

    def to_conv(self, merge: bool = False) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the same base parameters (merged with the update if asked)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self._kernel, self._stride, self._padding,
            self._dilation, bias=self.bias is not None, device="meta",
        )  # fmt: skip
        conv.weight = self.weight
        conv.bias = self.bias
        if merge:
            with torch.no_grad():
                conv.weight.add_(self.delta_weight().to(conv.weight.dtype))
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}->{self.out_channels}, kernel={self.kernel_size}, "
            f"rank={self.rank}, scale={self.scale}"
        )


LoRALayer = LoRALinear | LoRAConv2d
LORA_TYPES = (LoRALinear, LoRAConv2d)


def target_layer_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the layers of ``model`` that LoRA adapts, in module order.

    A name matches when it ends with one of ``targets``. For the UNet targets only the
    transformer blocks' attentions (``attn1``/``attn2``) count, which is what SD 1.x LoRA
    adapts; CLIP's targets match every ``self_attn`` projection. ``UNET_CONV_TARGETS`` match
    the convolutions of the up blocks' ResNets (``up_blocks.B.resnets.N.conv1`` / ``conv2``).
    """
    conv = targets == UNET_CONV_TARGETS
    kind = nn.Conv2d if conv else nn.Linear
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, kind) or ".lora_" in name:
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if targets == UNET_TARGETS and ".attn1." not in name and ".attn2." not in name:
            continue
        if conv and not (name.startswith(UNET_CONV_BLOCKS) and ".resnets." in name):
            continue
        names.append(name)
    return names


def earlier_conv_layout(keys: Iterable[str]) -> list[str]:
    """Keys of convolution adapters outside the up blocks: made by a version whose LoCon
    also adapted the down and middle blocks (``UNET_CONV_BLOCKS``)."""
    return sorted(
        k
        for k in keys
        if ".resnets." in k
        and any(f".{t}." in k or k.endswith(f".{t}") for t in UNET_CONV_TARGETS)
        and not k.startswith("unet." + UNET_CONV_BLOCKS)
    )


EARLIER_CONV_LAYOUT = (
    "adapts the convolutions of the down and middle blocks too, the LoCon layout of an "
    "earlier version; this version adapts the up blocks' only (they fuse far better, "
    "benchmarks/RESULTS.md)"
)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_lora(
    model: nn.Module, targets: tuple[str, ...], rank: int = 4, dropout: float = 0.0
) -> dict[str, LoRALayer]:
    """Replace each target layer of ``model`` with a ``LoRALinear`` / ``LoRAConv2d`` (a no-op
    until trained). Returns ``{module path: adapter layer}`` in module order.
    """
    layers: dict[str, LoRALayer] = {}
    for name in target_layer_names(model, targets):
        module = model.get_submodule(name)
        if isinstance(module, LORA_TYPES):
            raise RuntimeError(f"{name} already carries a LoRA adapter; remove it first")
        if isinstance(module, nn.Conv2d):
            lora: LoRALayer = LoRAConv2d(module, rank=rank, dropout=dropout)
        else:
            lora = LoRALinear(cast(nn.Linear, module), rank=rank, dropout=dropout)
        _set_submodule(model, name, lora)
        layers[name] = lora
    if not layers:
        raise RuntimeError(f"no layer of {type(model).__name__} matches LoRA targets {targets}")
    return layers


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LORA_TYPES):
            yield name, module


def remove_lora(model: nn.Module, merge: bool = False) -> int:
    """Swap every adapter layer back for its plain layer (merging its update if asked)."""
    found = list(lora_layers(model))
    for name, module in found:
        plain = module.to_linear(merge) if isinstance(module, LoRALinear) else module.to_conv(merge)
        _set_submodule(model, name, plain)
    return len(found)


def lora_state_dict(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix.<path>.lora_A.weight: A, prefix.<path>.lora_B.weight: B}`` for every adapter."""
    out: dict[str, torch.Tensor] = {}
    for name, module in lora_layers(model):
        out[f"{prefix}.{name}.lora_A.weight"] = module.lora_A.weight.detach()
        out[f"{prefix}.{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Copy adapter weights saved by ``lora_state_dict`` into the model's adapters (exact keys)."""
    layers = dict(lora_layers(model))
    wanted = {f"{prefix}.{n}.lora_{ab}.weight": (n, ab) for n in layers for ab in ("A", "B")}
    given = {k for k in state if k.startswith(prefix + ".")}
    missing, extra = sorted(set(wanted) - given), sorted(given - set(wanted))
    if missing or extra:
        raise KeyError(
            f"LoRA keys do not match the model: missing {missing[:3]}, extra {extra[:3]}"
        )
    with torch.no_grad():
        for key, (name, ab) in wanted.items():
            target = getattr(layers[name], f"lora_{ab}").weight
            if target.shape != state[key].shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} != {tuple(target.shape)}")
            target.copy_(state[key].to(target.dtype))
