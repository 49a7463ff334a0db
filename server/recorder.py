"""Feature capture for gradient fusion: Gram matrices accumulated in forward hooks.

``GramRecorder`` owns its hooks (nothing module-level), registers them on entry and removes
them in ``finally``. For each watched module it adds ``x^T x`` of the module's input (a
convolution adapter's im2col patches) to a ``[d, d]`` Gram matrix on the module's device
(fp64 by default), so memory is ``O(sum of d^2)`` whatever the number of tokens, steps or
concepts. A stride-1 convolution's statistics come from its input without building the
patches (``patches.patch_gram``, ``patches.patch_cross``: about 3x faster at 3x3). With
``keep_raw`` it also keeps the raw inputs (patches) in host memory, as the reference
implementation does; only the L-BFGS reference solver needs them.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..common.lora import LoRAConv2d
from .patches import patch_cross, patch_gram, supported


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
            if self.reduce is not None:
                xg = x.reshape(self.groups, -1, d).to(self.dtype)
                down = self.reduce[key].to(x.device, self.dtype)  # [groups, R, d]
                flat = xg.reshape(-1, d)
                if key not in self.grams:
                    self.grams[key] = torch.zeros(d, d, dtype=self.dtype, device=x.device)
                    self.crosses[key] = torch.zeros_like(down)
                    self.rows[key] = 0
                self.grams[key].addmm_(flat.T, flat)
                self.crosses[key].baddbmm_((xg @ down.transpose(1, 2)).transpose(1, 2), xg)
                self.rows[key] += xg.shape[1]
                return
            if self.groups > 1:  # [groups, rows of that model, d]
                xg = x.reshape(self.groups, -1, d).to(self.dtype)
                if key not in self.grams:
                    self.grams[key] = torch.zeros(
                        self.groups, d, d, dtype=self.dtype, device=x.device
                    )
                    self.rows[key] = 0
                self.grams[key].baddbmm_(xg.transpose(1, 2), xg)
                self.rows[key] += xg.shape[1]
                return
            x = x.reshape(-1, d)
            xd = x.to(self.dtype)
            if key not in self.grams:
                self.grams[key] = torch.zeros(d, d, dtype=self.dtype, device=x.device)
                self.rows[key] = 0
            self.grams[key].addmm_(xd.T, xd)
            self.rows[key] += x.shape[0]
            if self.keep_raw:
                self.raw.setdefault(key, []).append(x.float().cpu())

    def add_conv(self, key: str, module: LoRAConv2d, x: torch.Tensor) -> None:
        """Add the im2col patches of convolution ``module``'s input ``x`` ``[B, C, H, W]`` to
        group ``key``; for a stride-1 convolution without building them."""
        if self.keep_raw or not supported(module._stride, module._dilation):
            self.add(key, module.patches(x))
            return
        kernel, padding = module._kernel, cast(tuple[int, int], module.padding)
        with torch.no_grad():
            x = x.detach()
            chunks = x.chunk(self.groups)
            if len(chunks) != self.groups or len({c.shape[0] for c in chunks}) != 1:
                raise ValueError(f"{key}: a batch of {x.shape[0]} is not {self.groups} equal parts")
            if key not in self.grams:
                d = module.in_features
                per_model = self.groups > 1 and self.reduce is None
                shape = (self.groups, d, d) if per_model else (d, d)
                self.grams[key] = torch.zeros(shape, dtype=self.dtype, device=x.device)
                self.rows[key] = 0
                if self.reduce is not None:
                    self.crosses[key] = torch.zeros(
                        self.reduce[key].shape, dtype=self.dtype, device=x.device
                    )
            grams = self.grams[key]
            if self.reduce is not None:
                grams += patch_gram(x, kernel, padding, self.dtype)
                down = self.reduce[key].to(x.device)
                for k, chunk in enumerate(chunks):
                    self.crosses[key][k] += patch_cross(chunk, down[k], kernel, padding, self.dtype)
            elif self.groups > 1:
                for k, chunk in enumerate(chunks):
                    grams[k] += patch_gram(chunk, kernel, padding, self.dtype)
            else:
                grams += patch_gram(x, kernel, padding, self.dtype)
            h, w = x.shape[2:]
            positions = (h + 2 * padding[0] - kernel[0] + 1) * (w + 2 * padding[1] - kernel[1] + 1)
            self.rows[key] += chunks[0].shape[0] * positions

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
