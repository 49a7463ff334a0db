"""LoRA files of other tools, in and out: kohya / AUTOMATIC1111 and diffusers / PEFT.

The common currency is a factor table ``{layer key: (up [out, r], down [r, in_flat])}``
whose update is ``up @ down`` at scale 1, keyed as this project keys its layers
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``); convolution factors are
flattened (``down`` ``[r, in * kh * kw]``). A concept package and a fused model are both
such tables (``package_factors``, ``FusedModel.factors``).

kohya / A1111 (``lora_unet_*``, ``lora_te_*``)
    ``<name>.lora_down.weight`` ``[r, in(, kh, kw)]``, ``<name>.lora_up.weight``
    ``[out, r(, 1, 1)]`` and ``<name>.alpha``: the update is ``alpha / r * up @ down``.
    ``<name>`` is the diffusers module path with ``_`` for ``.``.
diffusers / PEFT (``pipe.save_lora_weights``)
    ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.<path>...``; the
    scale is ``lora_alpha / r`` from the header's ``lora_adapter_metadata`` when it is
    there, else 1 (diffusers' default ``lora_alpha = r``).

Reading never unpickles: ``.ckpt`` / ``.pt`` LoRAs are refused with a way out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .base import BaseModel
from .package import PackageError, expected_lora_shapes
from .safecheck import HeaderError, check_header

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
MAX_LORA_BYTES = 2 << 30  # an SDXL LoRA at rank 128 is ~0.9 GB
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# SDXL files name the two text encoders te1 / te2
KOHYA_SDXL_PREFIXES = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te1_",
    "text_encoder_2": "lora_te2_",
}
# (down, up) suffixes: PEFT's, and diffusers' earlier UNet and text-encoder names
DIFFUSERS_PAIRS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_")


class LoraFormatError(PackageError):
    """A LoRA file of another tool cannot be read or does not fit; the message says why."""


@dataclass(frozen=True)
class Layer:
    """One layer LoRA may adapt on a base: its key, and the shapes of its factors."""

    key: str
    down_shape: tuple[int, ...]  # [in] or [in, kh, kw]: the factor shape without the rank
    out_features: int

    @property
    def conv(self) -> bool:
        return len(self.down_shape) == 3

    @property
    def in_flat(self) -> int:
        n = 1
        for d in self.down_shape:
            n *= d
        return n


def base_layers(base: BaseModel, conv: bool = True) -> dict[str, Layer]:
    """Every layer this project adapts on ``base`` (with ``conv``: the up-block ResNet
    convolutions as well), by key."""
    shapes = expected_lora_shapes(base, 1, 1 if conv else 0)
    out: dict[str, Layer] = {}
    for key, shape in shapes.items():
        if key.endswith(".lora_A.weight"):
            layer = key[: -len(".lora_A.weight")]
            out_features = shapes[f"{layer}.lora_B.weight"][0]
            out[layer] = Layer(layer, tuple(shape[1:]), out_features)
    return out


def kohya_name(key: str, sdxl: bool = False) -> str:
    """``unet.down_blocks.0.attentions.0...to_out.0`` -> ``lora_unet_down_blocks_0_..._to_out_0``
    (SDXL: ``text_encoder.`` -> ``lora_te1_``, ``text_encoder_2.`` -> ``lora_te2_``)."""
    prefix, path = key.split(".", 1)
    return (KOHYA_SDXL_PREFIXES if sdxl else KOHYA_PREFIXES)[prefix] + path.replace(".", "_")


def _sdxl_keys(keys) -> bool:
    return any(k.startswith("text_encoder_2.") for k in keys)


# --- reading ---------------------------------------------------------------------------


def read_lora_file(
    path: str | Path, max_bytes: int = MAX_LORA_BYTES
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a ``.safetensors`` LoRA file (checked first)."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file")
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise LoraFormatError(
            f"{path}: a pickled file; this project never unpickles files. Convert it to "
            ".safetensors with the tool that made it (kohya sd-scripts and diffusers both "
            "save safetensors) and import that"
        )
    size = path.stat().st_size
    if size > max_bytes:
        raise LoraFormatError(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
    try:
        check_header(path, max_bytes=max_bytes)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (HeaderError, SafetensorError, OSError, ValueError) as err:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({err})") from err
    return tensors, meta


def detect_format(tensors: Mapping[str, torch.Tensor], sdxl_base: bool = False) -> str:
    """``kohya`` or ``diffusers``, from the key names; anything else is refused."""
    keys = list(tensors)
    xl_file = any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys)
    if xl_file and not sdxl_base:
        raise LoraFormatError(
            "an SDXL LoRA (lora_te1_/lora_te2_ keys); this base is SD 1.x/2.x: use it with an "
            "SDXL base"
        )
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.endswith(tuple(s for pair in DIFFUSERS_PAIRS for s in pair)) for k in keys):
        return "diffusers"
    if any(".processor." in k and "_lora." in k for k in keys):
        raise LoraFormatError(
            "a LoRA in diffusers' old attention-processor layout (e.g. "
            f"{next(k for k in keys if '.processor.' in k)}); load it in diffusers and "
            "`save_lora_weights` it again to get the current layout"
        )
    raise LoraFormatError(
        "not a LoRA this project reads: expected kohya keys (lora_unet_*, lora_te_*) or "
        f"diffusers/PEFT keys (*.lora_A.weight); the file has e.g. {keys[:3]}"
    )


@dataclass
class Imported:
    """A foreign LoRA as a factor table, and what did not map."""

    format: str
    factors: Factors
    unmapped: list[str] = field(default_factory=list)  # the file's layer names we lack
    scales: dict[str, float] = field(default_factory=dict)  # alpha / r applied, per layer


def _check_factors(
    name: str, layer: Layer, up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, r], down [r, in_flat])`` from a file's factors; a shape that does not fit
    the base (a LoRA for another model) is an error naming the key."""
    r = down.shape[0]
    want_down = (r, *layer.down_shape)
    want_up = (layer.out_features, r, 1, 1) if layer.conv else (layer.out_features, r)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise LoraFormatError(
            f"{name}: factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit this base's "
            f"{layer.key} (needs [out {layer.out_features}, r] @ [r, {list(layer.down_shape)}]): "
            "a LoRA for another base model?"
        )
    for t, which in ((up, "up"), (down, "down")):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise LoraFormatError(f"{name}: the {which} factor is not finite floating point")
    return up.reshape(layer.out_features, r).float(), down.reshape(r, -1).float()


def parse_kohya(tensors: Mapping[str, torch.Tensor], layers: Mapping[str, Layer]) -> Imported:
    """A kohya / A1111 LoRA (LoCon convolutions included) as a factor table at scale 1."""
    sdxl = _sdxl_keys(layers)
    by_name = {kohya_name(key, sdxl): layer for key, layer in layers.items()}
    names = sorted({k.split(".", 1)[0] for k in tensors})
    out = Imported("kohya", {})
    for name in names:
        down_key, up_key, alpha_key = (
            f"{name}.lora_down.weight",
            f"{name}.lora_up.weight",
            f"{name}.alpha",
        )
        known = {down_key, up_key, alpha_key}
        extra = sorted(k for k in tensors if k.split(".", 1)[0] == name and k not in known)
        if extra:
            raise LoraFormatError(
                f"{extra[0]}: not a plain LoRA factor (LoHa, LoKr, DoRA and other LyCORIS "
                "kinds are not LoRA and cannot be fused as one)"
            )
        if down_key not in tensors or up_key not in tensors:
            raise LoraFormatError(f"{name}: needs both lora_down and lora_up weights")
        layer = by_name.get(name)
        if layer is None:
            out.unmapped.append(name)
            continue
        up, down = _check_factors(name, layer, tensors[up_key], tensors[down_key])
        r = down.shape[0]
        alpha = float(tensors[alpha_key].float().reshape(-1)[0]) if alpha_key in tensors else r
        if not alpha > 0 or not torch.isfinite(torch.tensor(alpha)):
            raise LoraFormatError(f"{alpha_key}: alpha {alpha} must be a positive number")
        out.scales[layer.key] = alpha / r
        out.factors[layer.key] = (up * (alpha / r), down)
    return out


def _diffusers_scales(meta: Mapping[str, str]) -> dict[str, float]:
    """Per prefix (``unet``, ``text_encoder``), ``lora_alpha / r`` from the header."""
    raw = meta.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"header {DIFFUSERS_METADATA_KEY} is not JSON ({err})") from err
    scales = {}
    for prefix in ("unet", "text_encoder"):
        for key in ("rank_pattern", "alpha_pattern"):
            if data.get(f"{prefix}.{key}"):
                raise LoraFormatError(
                    f"{prefix}.{key} in the header: per-layer ranks/alphas by pattern are not "
                    "read; save the LoRA with one lora_alpha per model"
                )
        if data.get(f"{prefix}.use_dora"):
            raise LoraFormatError(f"{prefix}: a DoRA adapter is not LoRA and cannot be fused")
        r, alpha = data.get(f"{prefix}.r"), data.get(f"{prefix}.lora_alpha")
        if r and alpha:
            scales[prefix] = float(alpha) / float(r)
    return scales


def diffusers_layer_key(name: str) -> str:
    """A diffusers / PEFT module path as this project keys it: ``text_encoder.encoder.`` (CLIP
    without ``text_model``, as transformers 5 names it) gets ``text_model.``; PEFT's
    ``base_model.model.`` goes; a bare UNet path gets ``unet.``."""
    name = name.removeprefix("base_model.model.")
    if name.startswith("text_encoder.encoder."):
        return "text_encoder.text_model." + name[len("text_encoder.") :]
    if name.startswith(UNET_ROOTS):
        return "unet." + name
    return name


def parse_diffusers(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], layers: Mapping[str, Layer]
) -> Imported:
    """A diffusers / PEFT LoRA (``save_lora_weights``) as a factor table at scale 1."""
    scales = _diffusers_scales(meta)
    out = Imported("diffusers", {})
    pairs: dict[str, tuple[str, str]] = {}
    for key in tensors:
        for down_suffix, up_suffix in DIFFUSERS_PAIRS:
            if key.endswith(down_suffix):
                name = key[: -len(down_suffix)]
                pairs[name] = (key, name + up_suffix)
            elif key.endswith(up_suffix):
                pairs.setdefault(
                    key[: -len(up_suffix)], (key[: -len(up_suffix)] + down_suffix, key)
                )
    used = {k for pair in pairs.values() for k in pair}
    stray = sorted(k for k in tensors if k not in used)
    if stray:
        raise LoraFormatError(
            f"{stray[0]}: not a LoRA factor (DoRA magnitudes, biases and other adapter kinds "
            "cannot be fused as LoRA)"
        )
    for name in sorted(pairs):
        down_key, up_key = pairs[name]
        if down_key not in tensors or up_key not in tensors:
            raise LoraFormatError(f"{name}: needs both factors ({down_key}, {up_key})")
        layer = layers.get(diffusers_layer_key(name))
        if layer is None:
            out.unmapped.append(name)
            continue
        up, down = _check_factors(name, layer, tensors[up_key], tensors[down_key])
        scale = scales.get(layer.key.split(".", 1)[0], 1.0)
        out.scales[layer.key] = scale
        out.factors[layer.key] = (up * scale, down)
    return out


def parse_lora(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], base: BaseModel
) -> Imported:
    """A kohya or diffusers LoRA for ``base`` as a factor table (format detected)."""
    layers = base_layers(base, conv=True)
    fmt = detect_format(tensors, sdxl_base=base.architecture == "sdxl")
    if fmt == "kohya":
        return parse_kohya(tensors, layers)
    return parse_diffusers(tensors, meta, layers)


# --- writing ---------------------------------------------------------------------------


def package_factors(lora: Mapping[str, torch.Tensor]) -> Factors:
    """A package's ``lora`` tensors as a factor table (convolutions flattened)."""
    out: Factors = {}
    for key, down in lora.items():
        if key.endswith(".lora_A.weight"):
            layer = key[: -len(".lora_A.weight")]
            up = lora[f"{layer}.lora_B.weight"]
            out[layer] = (
                up.reshape(up.shape[0], -1).float(),
                down.reshape(down.shape[0], -1).float(),
            )
    return out


def _shaped(
    layer: Layer, up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r = down.shape[0]
    if layer.conv:
        return up.reshape(layer.out_features, r, 1, 1), down.reshape(r, *layer.down_shape)
    return up, down


def to_diffusers(
    factors: Factors, layers: Mapping[str, Layer], dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file ``pipe.load_lora_weights`` reads (scale 1: no alpha)."""
    out = {}
    for key, (up, down) in factors.items():
        up, down = _shaped(layers[key], up, down)
        out[f"{key}.lora_A.weight"] = down.to(dtype).contiguous()
        out[f"{key}.lora_B.weight"] = up.to(dtype).contiguous()
    return out


def to_kohya(
    factors: Factors, layers: Mapping[str, Layer], dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The tensors of a kohya / A1111 LoRA file (``alpha`` = rank, so scale 1)."""
    out = {}
    sdxl = _sdxl_keys(layers)
    for key, (up, down) in factors.items():
        up, down = _shaped(layers[key], up, down)
        name = kohya_name(key, sdxl)
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    return out
