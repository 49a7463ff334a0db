"""Training settings, validated early with messages a user understands.

Defaults are METHOD.md section 1 (the paper and the reference configs). The server sends
the same model to clients in the federation, so it lives in ``common``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel as _Model
from pydantic import ConfigDict, Field, field_validator


class TrainConfig(_Model):
    """ED-LoRA (or vanilla LoRA) tuning of one concept."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Literal["edlora", "lora"] = Field(
        "edlora", description="edlora: 2 words x L layer-wise embeddings; lora: 1 token (baseline)"
    )
    steps: int = Field(800, ge=1, le=1_000_000, description="optimizer steps")
    batch_size: int = Field(2, ge=1, le=256)
    resolution: int | None = Field(
        None, ge=8, le=4096, description="training resolution in px; None = the base's native"
    )
    rank: int = Field(4, ge=1, le=256, description="LoRA rank (METHOD.md: 4)")
    conv_rank: int = Field(
        0,
        ge=0,
        le=256,
        description="rank of LoRA on the UNet's up-block ResNet convolutions (LoCon; 0: none, as "
        "METHOD.md); trained at the UNet LoRA learning rate",
    )
    lr_embedding: float = Field(1e-3, ge=0, le=1)
    lr_text_lora: float = Field(1e-5, ge=0, le=1)
    lr_unet_lora: float = Field(1e-4, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0, le=1)
    lr_schedule: Literal["linear", "constant"] = "linear"
    noise_offset: float = Field(0.01, ge=0, le=1)
    embedding_norm_threshold: float | None = Field(
        0.55, gt=0, description="freeze the embeddings once their mean L2 norm reaches this"
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    kv_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on cross-attention key/value text input (0.2 for objects)",
    )
    mask_loss: bool = Field(True, description="with masks: the loss counts only inside the mask")
    attention_reg_weight: float = Field(
        0.01, ge=0, description="with masks: weight of the cross-attention regularisation"
    )
    flip_p: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on GPU, fp32 on CPU"
    )
    gradient_checkpointing: bool | None = Field(None, description="None: on for GPU, off for CPU")
    seed: int = Field(0, ge=0)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"resolution {v} must be a multiple of 8")
        return v
