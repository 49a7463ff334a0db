"""Training and fusion settings, validated early with messages a user understands.

Defaults follow the method (docs/method.md, section 1). The server sends the same model to
clients in the federation, so it lives in ``common``. Each field is the one definition of
its setting: ``mos-client``'s options and the run config's training keys are derived from
these fields (``common/settings.py``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel as _Model
from pydantic import ConfigDict, Field, field_validator, model_validator


class TrainConfig(_Model):
    """ED-LoRA (or vanilla LoRA) tuning of one concept."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Literal["edlora", "lora"] = Field(
        "edlora", description="edlora: 2 words x L layer-wise embeddings; lora: 1 token (baseline)"
    )
    steps: int = Field(800, ge=1, le=1_000_000, description="optimizer steps")
    batch_size: int = Field(2, ge=1, le=256, description="photos per optimizer step")
    resolution: int = Field(
        0, ge=0, le=4096, description="training resolution in px, a multiple of 8; 0: the base's"
    )
    rank: int = Field(4, ge=1, le=256, description="LoRA rank")
    conv_rank: int = Field(
        0,
        ge=0,
        le=256,
        description="also adapt the UNet's up-block ResNet convolutions at this rank (LoCon; 0: "
        "none, as the paper); trained at the UNet LoRA learning rate",
    )
    lr_embedding: float = Field(1e-3, ge=0, le=1, description="embedding learning rate")
    lr_text: float = Field(1e-5, ge=0, le=1, description="text-encoder LoRA learning rate")
    lr_unet: float = Field(1e-4, ge=0, le=1, description="UNet LoRA learning rate")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay")
    lr_schedule: Literal["linear", "constant"] = Field(
        "linear", description="learning-rate schedule over the steps"
    )
    noise_offset: float = Field(0.01, ge=0, le=1, description="offset noise")
    embedding_norm_threshold: float = Field(
        0.55,
        ge=0,
        description="freeze the embeddings once their mean L2 norm reaches this; 0: never",
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    kv_dropout: float = Field(
        0.0,
        ge=0,
        le=1,
        description="dropout on cross-attention key/value text input (0.2 for objects)",
    )
    kv_dropout_mode: Literal["features", "lora"] = Field(
        "lora",
        description="what kv_dropout drops: (the authors') each attn2 to_k/to_v LoRA branch, "
        "off for a whole step with probability kv_dropout, or elements of the cross-attention "
        "key/value text input (features)",
    )
    augment: Literal["none", "canvas", "crop"] = Field(
        "none",
        description="per-step augmentation: none (a fixed centre crop); canvas (the authors' "
        "subjects: random crop, then placed at a random position and scale on a black canvas, "
        "loss only on the photo); crop (the authors' objects: a random crop)",
    )
    canvas_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="with augment canvas: the long edge is drawn between this fraction of the "
        "resolution and all of it (authors: 1.0 for people, 0.5 for objects)",
    )
    caption_templates: Literal["none", "object", "human"] = Field(
        "none",
        description="each step, a photo's caption (its tag list, or <TOK>) is shuffled after "
        "its first tag and put into a random template of this kind, as the authors do",
    )
    mask_loss: bool = Field(True, description="with masks: the loss counts only inside the mask")
    attention_reg_weight: float = Field(
        0.01, ge=0, description="with masks: weight of the cross-attention regularisation"
    )
    attention_reg_form: Literal["squared", "linear", "full-identity"] = Field(
        "linear",
        description="the attention regularisation: linear (the authors': per resolution, both "
        "words' mean attention off the mask); full-identity (the authors' other form: the "
        "second word's squared error to the mask); squared (per layer, second word to the "
        "mask, first word squared off it). The three keep the same identity on the toy base",
    )
    flip_p: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability of a horizontal flip (the authors never flip; keep 0 for "
        "subjects with a handedness: text, logos)",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on GPU, fp32 on CPU"
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on for GPU, off for CPU"
    )
    seed: int = Field(0, ge=0, description="seed of the initial embeddings, noise and batches")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"resolution {v} must be a multiple of 8")
        return v

    @model_validator(mode="after")
    def _kv_dropout_below_one_on_features(self) -> TrainConfig:
        if self.kv_dropout_mode == "features" and self.kv_dropout >= 1:
            raise ValueError(
                "kv_dropout 1 drops all the text input: it must be below 1 "
                "(or use kv_dropout_mode lora)"
            )
        return self


CONV_SAMPLES = 8  # stage-4 images per concept by default once convolutions are fused


class FusionConfig(_Model):
    """Settings of one fusion; defaults follow the method (docs/method.md, section 2).

    Each field is the one definition of its setting: ``mos-fuse``'s options and the run
    config's ``fusion-*`` keys are derived from these fields (``common/settings.py``).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["sequential", "independent"] = Field(
        "sequential",
        description="sequential: the paper's stage order (later stages see the fused earlier "
        "ones); independent: every statistic from the concept's own model, so adding or "
        "removing a concept re-records only that one",
    )
    solver: Literal["exact", "lbfgs"] = Field(
        "exact",
        description="exact normal equations from Gram matrices, or L-BFGS on the raw features "
        "(the authors' solver; slow, for comparison)",
    )
    steps: int = Field(20, ge=1, le=1000, description="sampling steps recorded in stage 4")
    resolution: int = Field(
        0, ge=0, le=4096, description="stage-4 sampling size in px; 0: the base's"
    )
    samples: int = Field(
        0,
        ge=0,
        le=64,
        description=f"images sampled per concept in stage 4; 0: 1, or {CONV_SAMPLES} when "
        "convolution adapters are fused (their im2col inputs are wide and a small latent has "
        "few positions)",
    )
    concept_batch: int = Field(
        8, ge=1, le=256, description="concept models sampled together in one batch in stage 4"
    )
    seed: int = Field(0, ge=0, description="seed of the stage-4 sampling noise")
    ridge: float = Field(
        1e-2, ge=0, description="relative ridge of the exact solve (times the mean Gram eigenvalue)"
    )
    ridge_target: Literal["base", "average"] = Field(
        "average",
        description="what the ridge pulls toward: the weight-fusion average (measured better) "
        "or the base weights (the paper's wording, with ridge 1e-6)",
    )
    gram_dtype: Literal["float64", "float32"] = Field(
        "float64", description="precision of the accumulated Gram matrices"
    )
    lbfgs_iterations_text: int = Field(
        500, ge=1, description="L-BFGS iterations on the text encoder and k/v layers"
    )
    lbfgs_iterations_unet: int = Field(
        50, ge=1, description="L-BFGS iterations on the UNet spatial layers"
    )
    kv_positions: Literal["concept", "concept+eos", "all"] = Field(
        "all",
        description="stage-3 features: the concept's token positions (the paper), those and "
        "the end token (the authors' code), or every position of the concept prompts",
    )
    text_positions: Literal["all", "prompt"] = Field(
        "all",
        description="stage-2 features: every position the text encoder sees, padding "
        "included, or the unpadded prompt up to its end token (the authors' code)",
    )
    text_prompts: tuple[str, ...] = Field(
        ("photo of a {}", "{}"), description="stage-2 prompts ({} is the concept)"
    )
    sample_prompt: str = Field("photo of a {}", description="stage-4 prompt ({} is the concept)")
