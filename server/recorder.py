"""Feature capture for gradient fusion: Gram matrices accumulated in forward hooks.

``GramRecorder`` owns its hooks (nothing module-level), registers them on entry and removes
them in ``finally``. For each watched module it adds ``x^T x`` of the module's input (a
convolution adapter's im2col patches) to a ``[d, d]`` Gram matrix on the module's device
(fp64 by default, bitwise symmetric: ``solve.symmetric``), so memory is ``O(sum of d^2)`` whatever the number of tokens, steps or
concepts. A stride-1 convolution's statistics come from its input without building the
patches (``patches.patch_gram``, ``patches.patch_cross``: about 3x faster at 3x3). With
``keep_raw`` it also keeps the raw inputs (patches) in host memory, as the reference
implementation does; only the L-BFGS reference solver needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn

from ..common.lora import LoRAConv2d
from .patches import patch_cross, patch_gram, supported
from .solve import symmetric


class GramRecorder:
    def __init__(
        self,
        modules: dict[str, nn.Module],
        dtype: torch.dtype = torch.float64,
        keep_raw: bool = False,
        groups: int = 1,
        reduce: dict[str, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """``groups > 1``: the batch holds that many models' rows one after the other (equal
        numbers); each gets its own Gram matrix, ``grams[key]`` is then ``[groups, d, d]``.

        ``reduce``: instead of one Gram matrix per model, keep only their sum
        ``grams[key]`` ``[d, d]`` and ``crosses[key][k] = D_k X_k^T X_k`` ``[R, d]`` for the
        given ``reduce[key]`` = ``D`` ``[groups, R, d]`` (the models' stacked LoRA down
        factors): all gradient fusion needs, in ``O(d^2 + groups * R * d)`` memory.

        ``positions``: a boolean ``[batch, tokens]`` mask; of inputs ``[batch, tokens, d]``
        only the rows it marks are recorded (the text encoder's unpadded prompt positions).
        """
        if reduce is not None:
            groups = next(iter(reduce.values())).shape[0]
        if groups > 1 and keep_raw:
            raise ValueError("raw features are kept for one model at a time")
        self.modules = modules
        self.dtype = dtype
        self.keep_raw = keep_raw
        self.groups = groups
        self.reduce = reduce
        self.positions = positions
        self.crosses: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.raw: dict[str, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, key: str, x: torch.Tensor) -> None:
        """Add rows ``x`` ``[..., d]`` to group ``key`` (also used without hooks)."""
        with torch.no_grad():
            d = x.shape[-1]
            x = x.detach()
            if self.positions is not None and x.dim() == 3:
                if x.shape[:2] != self.positions.shape:
                    raise ValueError(
                        f"{key}: inputs {tuple(x.shape)} do not match the position mask "
                        f"{tuple(self.positions.shape)}"
                    )
                x = x[self.positions.to(x.device)]
            x = x.reshape(-1, d)
            if self.keep_raw:
                self.raw.setdefault(key, []).append(x.float().cpu())
            rows = x.to(self.dtype)
            per_model = rows.reshape(self.groups, -1, d).unbind(0)  # each model's rows
            self._accumulate(
                key,
                d,
                rows,
                per_model,
                per_model[0].shape[0],
                lambda r: symmetric(r.T @ r),
                lambda r, down: (r @ down.T).T @ r,
            )

    def add_conv(self, key: str, module: LoRAConv2d, x: torch.Tensor) -> None:
        """Add the im2col patches of convolution ``module``'s input ``x`` ``[B, C, H, W]`` to
        group ``key``; for a stride-1 convolution without building them."""
        if self.keep_raw or not supported(module._stride, module._dilation):
            self.add(key, module.patches(x))
            return
        kernel, padding = module._kernel, cast(tuple[int, int], module.padding)
        with torch.no_grad():
            x = x.detach()
            per_model = x.chunk(self.groups)
            if len(per_model) != self.groups or len({c.shape[0] for c in per_model}) != 1:
                raise ValueError(f"{key}: a batch of {x.shape[0]} is not {self.groups} equal parts")
            h, w = x.shape[2:]
            positions = (h + 2 * padding[0] - kernel[0] + 1) * (w + 2 * padding[1] - kernel[1] + 1)
            self._accumulate(
                key,
                module.in_features,
                x,
                per_model,
                per_model[0].shape[0] * positions,
                lambda c: patch_gram(c, kernel, padding, self.dtype),
                lambda c, down: patch_cross(c, down, kernel, padding, self.dtype),
            )

    def _accumulate(
        self,
        key: str,
        d: int,
        whole: torch.Tensor,
        per_model: Sequence[torch.Tensor],
        rows: int,
        gram: Callable[[torch.Tensor], torch.Tensor],
        cross: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        """Add one input to group ``key``'s statistics, the same for rows and convolutions:
        ``gram(t)`` is ``X^T X`` of input ``t``'s rows, ``cross(t, D)`` is ``D X^T X``;
        ``whole`` is the batch, ``per_model`` its part of each model, ``rows`` how many
        rows each model's part holds."""
        if key not in self.grams:
            per_model_grams = self.groups > 1 and self.reduce is None
            shape = (self.groups, d, d) if per_model_grams else (d, d)
            self.grams[key] = torch.zeros(shape, dtype=self.dtype, device=whole.device)
            self.rows[key] = 0
            if self.reduce is not None:
                self.crosses[key] = torch.zeros(
                    self.reduce[key].shape, dtype=self.dtype, device=whole.device
                )
        if self.reduce is not None:
            self.grams[key] += gram(whole)
            downs = self.reduce[key].to(whole.device, self.dtype)  # [groups, R, d]
            for k, part in enumerate(per_model):
                self.crosses[key][k] += cross(part, downs[k])
        elif self.groups > 1:
            for k, part in enumerate(per_model):
                self.grams[key][k] += gram(part)
        else:
            self.grams[key] += gram(whole)
        self.rows[key] += rows

    def __enter__(self) -> GramRecorder:
        try:
            for key, module in self.modules.items():
                if isinstance(module, LoRAConv2d):  # its inputs are im2col patches
                    hook = lambda m, args, key=key: self.add_conv(key, m, args[0])  # noqa: E731
                else:
                    hook = lambda _m, args, key=key: self.add(key, args[0])  # noqa: E731
                self._handles.append(module.register_forward_pre_hook(hook))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
