"""The four stages of gradient fusion (docs/method.md, section 2), each a named object.

1. ``TokenStage``: every concept's tokens and layer-wise embeddings go into the base's
   tokenizer and embedding matrix; nothing is averaged.
2. ``TextEncoderStage``: each concept's text encoder (base + its LoRA) on its prompts.
3. ``KeyValueStage``: the cross-attention keys/values read text only: their inputs are the
   (fused, in sequential mode) text encoder's outputs at the concept's prompt positions,
   copy ``l`` for layer ``l``.
4. ``SpatialStage``: each concept's model samples its prompt and every step's inputs of the
   UNet's other adapted layers are recorded; several concept models share one batch.

Stages 2-4 solve the layers of one ``part`` (``text``, ``kv``, ``spatial``). Their
``record`` method runs the models and returns a ``GramRecorder`` of the inputs; the
engine (``server/fusion.py``) turns recordings into Gram sums and solves each layer. In
``sequential`` mode ``upstream`` holds the fused factors of the earlier stages, in
``independent`` mode it is ``None`` and each concept's own model is used throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..common.attention import cross_attention_layers
from ..common.concepts import encode_prompts, prompt_token_ids, through_end_token
from ..common.config import FusionConfig
from ..common.edlora import add_concept_tokens, write_embeddings
from ..common.package import ConceptPackage
from ..common.pipeline import MixOfShowPipeline
from .recorder import GramRecorder

if TYPE_CHECKING:
    from .fusion import Factors, FusionEngine


class TokenStage:
    """Stage 1: a concept's tokens and embeddings, appended to the base (idempotent)."""

    name: ClassVar[str] = "tokens"

    def attach(self, engine: FusionEngine, package: ConceptPackage) -> None:
        base, concept = engine.base, package.concept
        vocab = base.tokenizer.get_vocab()
        if not all(t in vocab for t in concept.all_tokens()):
            add_concept_tokens(base, concept)
        write_embeddings(base, concept, package.embeddings)
        if concept.name not in engine.table:
            engine.table.add(concept)

    def run(self, engine: FusionEngine, names: Sequence[str]) -> None:
        """Make sure every concept of ``names`` is in the base with its own embeddings."""
        for name in names:
            self.attach(engine, engine.packages[name])


class SolvedStage:
    """A stage that records the inputs of one part's layers and solves them."""

    name: ClassVar[str]
    part: ClassVar[str]

    def batch(self, config: FusionConfig) -> int:
        """How many concepts one recording may take (their statistics stay separate)."""
        return 1

    def reduces(self, config: FusionConfig) -> bool:
        """Whether the recording keeps only the Gram sum and the cross terms (``reduce``):
        possible where no per-concept statistic is kept for later."""
        return False

    def record(
        self,
        engine: FusionEngine,
        names: Sequence[str],
        upstream: Factors | None,
        reduce: dict[str, torch.Tensor] | None = None,
    ) -> GramRecorder:
        raise NotImplementedError


class TextEncoderStage(SolvedStage):
    """Stage 2: the concept's own text encoder on its prompts (every layer-wise copy); the
    features are every position, or with ``text_positions`` ``prompt`` those up to the end
    token (the causal text encoder gives them the same values as an unpadded prompt)."""

    name = "text encoder"
    part = "text"

    @torch.no_grad()
    def record(
        self,
        engine: FusionEngine,
        names: Sequence[str],
        upstream: Factors | None,
        reduce: dict[str, torch.Tensor] | None = None,
    ) -> GramRecorder:
        (name,) = names
        engine.apply(engine.concept_factors(name), (self.part,))
        positions = None
        if engine.config.text_positions == "prompt":
            tok = engine.base.tokenizer
            ids, _ = prompt_token_ids(tok, engine.prompts_of(name), engine.table, engine.num_layers)
            positions = through_end_token(ids, tok.eos_token_id)
        with engine.recorder(self.part, positions=positions) as rec:
            encode_prompts(
                engine.base.text, engine.prompts_of(name), engine.table, engine.num_layers
            )
        return rec


class KeyValueStage(SolvedStage):
    """Stage 3: text-encoder outputs at ``kv_positions`` of the concept's prompts, per layer
    copy, as the inputs of every cross-attention layer's to_k / to_v."""

    name = "cross-attention keys/values"
    part = "kv"

    @torch.no_grad()
    def record(
        self,
        engine: FusionEngine,
        names: Sequence[str],
        upstream: Factors | None,
        reduce: dict[str, torch.Tensor] | None = None,
    ) -> GramRecorder:
        (name,) = names
        engine.apply(upstream if upstream is not None else engine.concept_factors(name), ("text",))
        hidden, positions = engine.concept_prompt_features(name, engine.config.kv_positions)
        rec = engine.recorder(self.part)
        for layer, (attn_name, _) in enumerate(cross_attention_layers(engine.base.unet)):
            rec.add(f"unet.{attn_name}.kv", hidden[:, layer][positions])
        return rec


class SpatialStage(SolvedStage):
    """Stage 4: each concept's model samples ``sample_prompt`` and every step's inputs of the
    spatial layers are recorded.

    Several concepts are sampled together, one batch chunk per concept model, each from the
    same starting noise it would get alone; with several names the recorder's Gram matrices
    are ``[len(names), d, d]``, or reduced while recording (``reduce``, see
    ``GramRecorder``).
    """

    name = "UNet spatial layers"
    part = "spatial"

    def batch(self, config: FusionConfig) -> int:
        return config.concept_batch if config.solver == "exact" else 1

    def reduces(self, config: FusionConfig) -> bool:
        return config.solver == "exact" and config.mode == "sequential"

    @torch.no_grad()
    def record(
        self,
        engine: FusionEngine,
        names: Sequence[str],
        upstream: Factors | None,
        reduce: dict[str, torch.Tensor] | None = None,
    ) -> GramRecorder:
        own = [engine.concept_factors(n) for n in names]
        for part in ("text", "kv"):
            if upstream is not None:
                engine.apply(upstream, (part,))
            else:
                engine.apply_batched(own, (part,))
        engine.apply_batched(own, (self.part,))
        base, config = engine.base, engine.config
        size = config.resolution or base.default_resolution
        latent = size // base.vae_scale_factor
        samples = engine.stage4_samples
        shape = (samples, base.unet.config.in_channels, latent, latent)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))
        prompts = [config.sample_prompt.format(engine.packages[n].concept.token) for n in names]
        groups = len(names) if len(names) > 1 else 1
        try:
            with engine.recorder(self.part, groups, reduce) as rec:
                MixOfShowPipeline.from_base(base, engine.table)(
                    prompts,
                    num_inference_steps=config.steps,
                    guidance_scale=1.0,
                    height=size,
                    width=size,
                    num_images_per_prompt=samples,
                    latents=noise.repeat(len(names), 1, 1, 1),
                    output_type="latent",
                )
        finally:
            engine.apply(None)
        return rec


def default_stages() -> tuple[SolvedStage, ...]:
    """Stages 2-4 in the paper's order (stage 1, ``TokenStage``, needs no solve)."""
    return (TextEncoderStage(), KeyValueStage(), SpatialStage())
