"""Export a base model as a single-file SD 1.x or SDXL checkpoint (original key names).

The format people download from model sites: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (CLIP); SDXL:
``conditioner.embedders.0.transformer.*`` (CLIP ViT-L) and ``conditioner.embedders.1.model.*``
(OpenCLIP bigG: fused ``in_proj`` attention, ``text_projection`` as ``[width, proj]``). We
write it so a fused model can leave the project in that format, and so single-file
*loading* is tested without downloads: export the tiny model, load it back with diffusers'
``from_single_file`` and compare.

The key map follows the SD 1.x layout for any ``layers_per_block`` and number of blocks.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .base import BaseModel

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTN = [
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
]


def _sub(rest: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` keys -> LDM ``model.diffusion_model`` keys."""
    n = layers_per_block + 1
    up_has_attn = {
        int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if key.startswith("add_embedding.linear_1."):  # SDXL's pooled + time-id embedding
            new = "label_emb.0.0." + key.split(".", 2)[2]
        elif key.startswith("add_embedding.linear_2."):
            new = "label_emb.0.2." + key.split(".", 2)[2]
        elif key.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + key.split(".", 2)[2]
        elif key.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + key.split(".", 2)[2]
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + key[len("conv_in.") :]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + key[len("conv_norm_out.") :]
        elif key.startswith("conv_out."):
            new = "out.2." + key[len("conv_out.") :]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + i * n + j}.0.{_sub(rest, _RESNET)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + i * n + j}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_sub(m[2], _RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{i * n + j}.0.{_sub(rest, _RESNET)}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{i * n + j}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            i = int(m[1])
            slot = 2 if i in up_has_attn else 1
            new = f"output_blocks.{i * n + n - 1}.{slot}.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> LDM ``first_stage_model`` keys."""
    num_up = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_sub(m[3], _VAE_RESNET)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_sub(m[3], _VAE_RESNET)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_sub(m[3], _VAE_RESNET)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            new = f"{m[1]}.mid.attn_1.{_sub(m[2], _VAE_ATTN)}"
            if value.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP keys -> ``cond_stage_model.transformer.text_model.*``."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        k = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + k] = value
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` keys -> OpenCLIP keys under ``prefix`` (SDXL's
    second text encoder)."""
    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
             for k, v in state.items() if not k.endswith("position_ids")}  # fmt: skip
    out = {
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted(
        {int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    )
    pairs = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]  # fmt: skip
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for old, new in pairs:
                out[f"{dst}{new}.{kind}"] = state.pop(f"{src}{old}.{kind}")
    if state:
        raise KeyError(f"no OpenCLIP name for text-encoder keys {sorted(state)[:3]}")
    return {prefix + k: v for k, v in out.items()}


def ldm_state_dict(base: BaseModel) -> dict[str, torch.Tensor]:
    """The whole base in original SD 1.x (or SDXL) checkpoint layout."""
    state = {}
    state.update(unet_to_ldm(base.unet.state_dict(), base.unet.config.layers_per_block))
    state.update(vae_to_ldm(base.vae.state_dict()))
    te = text_encoder_to_ldm(base.text_encoder.state_dict())
    if base.text_encoder_2 is None:
        state.update(te)
        return state
    first = "conditioner.embedders.0.transformer."
    state.update({first + k[len("cond_stage_model.transformer.") :]: v for k, v in te.items()})
    state.update(
        open_clip_to_ldm(base.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
    )
    return state


def save_single_file(base: BaseModel, path: str | Path) -> Path:
    """Write ``base`` as one ``.safetensors`` checkpoint (weights only, no configs)."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ldm_state_dict(base).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
