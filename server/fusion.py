"""Gradient fusion of concept packages into one model (docs/method.md, section 2).

Stages, in the paper's order (each later stage sees the already fused earlier ones):

1. token embeddings: every concept's tokens and layer-wise embeddings are appended;
2. text encoder: for each concept, base text encoder + its LoRA on "photo of a TOK" and
   "TOK" (every layer-wise copy); the Gram matrix of every LoRA layer's input is recorded;
3. cross-attention keys/values: the (fused) text encoder's outputs at the concept's token
   positions, copy ``l`` for layer ``l``;
4. UNet spatial layers (attn1 q/k/v/out, attn2 q/out, and the up blocks' ResNet
   convolutions when a package adapts them, LoCon): each concept's model samples "photo of
   a TOK" (DPM-Solver, ``steps`` steps, no guidance) and every step's inputs are recorded; a
   convolution's inputs are its im2col patches, so it is solved as a linear map on them.

The stages are the objects of ``server/stages.py``; this module holds the engine that
attaches concepts, switches adapters, turns the stages' recordings into Gram sums and
solves. Each stage is solved per layer with ``solve.solve_downs`` (exact, from Grams) or
``solve.lbfgs_reference`` (the authors' solver, on raw features). Layers whose inputs are the
same tensor share one Gram matrix (q/k/v of self-attention; k/v of cross-attention).

Modes. ``sequential`` is the paper's: stages 3 and 4 run the concept's model with the fused
earlier stages, so their statistics depend on the whole set of concepts. ``independent``
records every statistic on the concept's own single-concept model: statistics are then
per-concept facts, kept, and adding or removing a concept only records (or drops) that one
concept's statistics before re-solving — exactly equal to fusing from scratch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..common.attention import cross_attention_layers
from ..common.base import BaseModel
from ..common.concepts import ConceptTable, concept_token_ids, encode_prompts, tokenize
from ..common.config import CONV_SAMPLES, FusionConfig
from ..common.lora import (
    UNET_CONV_TARGETS,
    UNET_TARGETS,
    LoRAConv2d,
    LoRALayer,
    inject_lora,
    target_layer_names,
)
from ..common.package import ConceptPackage, PackageError, free_name
from .recorder import GramRecorder
from .solve import (
    cross_term,
    lbfgs_reference,
    objective_from_stats,
    solve_downs,
    weight_fusion_factors,
)
from .stages import SolvedStage, TokenStage, default_stages

log = logging.getLogger(__name__)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # target key -> (up, down)
PARTS = ("text", "kv", "spatial")


@dataclass
class Group:
    """Target layers that read the same input tensor, and the module whose input is recorded."""

    key: str
    part: str
    hook: torch.nn.Module
    targets: list[str]


@dataclass
class FusionResult:
    strategy: str
    factors: Factors
    timings: dict[str, float] = field(default_factory=dict)
    objective: dict[str, float] = field(default_factory=dict)


def kv_positions(
    ids: torch.Tensor, concept_ids: torch.Tensor, eos_id: int, which: str
) -> torch.Tensor:
    """Boolean ``[prompts, tokens]`` mask of the stage-3 feature positions (see FusionConfig)."""
    if which == "all":
        return torch.ones_like(ids, dtype=torch.bool)
    mask = torch.isin(ids, concept_ids)
    if which == "concept+eos":
        is_eos = ids == eos_id
        first_eos = is_eos & (is_eos.cumsum(dim=1) == 1)
        mask |= first_eos
    return mask


def _role(leaf: str, parent: str) -> str:
    if leaf in UNET_CONV_TARGETS:
        return leaf  # each convolution reads its own input
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return "qkv"
    if leaf in ("out_proj", "to_out.0"):
        return "out"
    if parent.endswith("attn1"):
        return "qkv"
    return "q" if leaf == "to_q" else "kv"


class FusionEngine:
    """Holds a base with every concept attached and fuses them (see module docstring).

    The base is modified: all concepts' tokens are added and every LoRA-target layer
    becomes a ``LoRALinear`` (``LoRAConv2d``) whose factors are switched between concepts and
    fused results. The ResNet convolutions are adapted once any package carries adapters
    for them; concepts without get a zero update there.
    """

    def __init__(
        self,
        base: BaseModel,
        packages: Sequence[ConceptPackage],
        config: FusionConfig | None = None,
        sources: Sequence[str] | None = None,
    ) -> None:
        self.base = base
        self.config = config or FusionConfig()
        self.table = ConceptTable()
        self.packages: dict[str, ConceptPackage] = {}
        self.sources: dict[str, str] = {}
        # per concept: (text-encoder alpha, UNet alpha), the authors' per-concept LoRA scales
        self.alphas: dict[str, tuple[float, float]] = {}
        self.num_layers = base.num_cross_attention_layers
        self.layers: dict[str, LoRALayer] = {}
        self.part_of: dict[str, str] = {}
        self.conv = False
        for prefix, model, targets in base.lora_components():
            self._inject(prefix, model, targets)
        self.groups = self._groups()
        # independent mode: each concept's Gram matrices, kept in host memory (concept -> part ->
        # group -> G) so adding or removing a concept needs no re-recording
        self._cache: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self._raw: dict[str, dict[str, list[torch.Tensor]]] = {}  # L-BFGS only
        self.tokens = TokenStage()
        self.stages = default_stages()
        for i, pkg in enumerate(packages):
            self.add(pkg, sources[i] if sources else None)

    def _inject(self, prefix: str, model: torch.nn.Module, targets: tuple[str, ...]) -> None:
        kv_names = {
            f"{n}.{t}" for n, _ in cross_attention_layers(self.base.unet) for t in ("to_k", "to_v")
        }
        for name, layer in inject_lora(model, targets, rank=1).items():
            key = f"{prefix}.{name}"
            layer.requires_grad_(False)
            layer.scale = 0.0
            self.layers[key] = layer
            if targets not in (UNET_TARGETS, UNET_CONV_TARGETS):
                self.part_of[key] = "text"
            else:
                self.part_of[key] = "kv" if name in kv_names else "spatial"

    def _add_conv_layers(self) -> None:
        """Adapt the ResNet convolutions too; spatial statistics recorded without them are
        incomplete and dropped (the next fusion records them again)."""
        self._inject("unet", self.base.unet, UNET_CONV_TARGETS)
        self.conv = True
        self.groups = self._groups()
        # a convolution's Gram matrix is (in * kh * kw)^2: SD 1.5's 44 take 23 GB in fp32
        itemsize = 8 if self.config.gram_dtype == "float64" else 4
        size = sum(
            layer.in_features**2 * itemsize
            for layer in self.layers.values()
            if isinstance(layer, LoRAConv2d)
        )
        log.log(
            logging.WARNING if size > 8 * 1024**3 else logging.INFO,
            "convolution adapters: their Gram matrices take %.2f GB on %s (--gram-dtype "
            "float32 halves it)",
            size / 1024**3,
            self.base.device,
        )
        for name, cache in self._cache.items():
            if cache.pop("spatial", None) is not None:
                log.info("%s: spatial statistics dropped (convolution adapters added)", name)

    # --- concepts ---------------------------------------------------------------------
    def add(
        self,
        package: ConceptPackage,
        source: str | None = None,
        *,
        checked: bool = False,
        rename: bool = False,
    ) -> str:
        """Attach a concept: check it against the base (unless the caller has: ``checked``),
        add its tokens and embeddings. A name already attached is refused, or with
        ``rename`` the concept is renamed by ``free_name`` (``<dog1>`` -> ``<dog1-2>``).
        Returns the name the concept is attached under."""
        name = package.concept.name
        source = source or package.concept.token
        if name in self.packages:
            if not rename:
                raise PackageError(
                    f"{source}: concept {package.concept.token} is already taken by "
                    f"{self.sources[name]}"
                )
            package = package.renamed(free_name(name, self.packages))
            log.warning(
                "%s: concept <%s> is already taken by %s: renamed %s",
                source,
                name,
                self.sources[name],
                package.concept.token,
            )
            name = package.concept.name
        if not checked:
            package.check_against(self.base)
        if package.conv_rank and not self.conv:
            self._add_conv_layers()
        self.tokens.attach(self, package)  # stage 1: the base knows the concept from now on
        self.packages[name] = package
        self.sources[name] = source
        return name

    def set_alpha(self, name: str, text: float = 1.0, unet: float = 1.0) -> None:
        """Scale concept ``name``'s LoRA before fusion: its text-encoder update by ``text``
        and its UNet update by ``unet`` (the authors' ``text_encoder_alpha`` /
        ``unet_alpha``); statistics recorded with other scales are dropped."""
        if name not in self.packages:
            known = ", ".join(self.packages[n].concept.token for n in self.names) or "none"
            raise PackageError(f"alpha for unknown concept {name} (attached: {known})")
        if self.alphas.get(name, (1.0, 1.0)) != (text, unet):
            self._cache.pop(name, None)
            self._raw.pop(name, None)
        self.alphas[name] = (float(text), float(unet))

    def remove(self, name: str) -> None:
        """Forget a concept and its statistics (its tokens stay in the tokenizer, unused)."""
        self.packages.pop(name)
        self.sources.pop(name)
        self.alphas.pop(name, None)
        self._cache.pop(name, None)
        self._raw.pop(name, None)

    @property
    def names(self) -> list[str]:
        return list(self.packages)

    def statistics(self, name: str) -> dict[str, torch.Tensor]:
        """A concept's recorded Gram matrices (independent mode), as ``{"part|group": G}``.

        Empty until the concept has been fused once. ``load_statistics`` puts them back, so
        a restarted server re-solves without sampling the concept again.
        """
        return {
            f"{part}|{key}": g
            for part, grams in self._cache.get(name, {}).items()
            for key, g in grams.items()
        }

    def load_statistics(self, name: str, stats: dict[str, torch.Tensor]) -> None:
        """Reuse statistics saved by ``statistics`` (independent mode only; checked)."""
        if self.config.mode != "independent":
            return
        if name not in self.packages:
            raise PackageError(f"statistics for unknown concept {name}")
        cache: dict[str, dict[str, torch.Tensor]] = {}
        for flat, g in stats.items():
            part, _, key = flat.partition("|")
            group = self.groups.get(key)
            if group is None or group.part != part:
                raise PackageError(f"statistics of {name}: unknown layer group {flat}")
            cache.setdefault(part, {})[key] = g
        for part in PARTS:
            want = {k for k, g in self.groups.items() if g.part == part}
            if part in cache and set(cache[part]) != want:
                raise PackageError(f"statistics of {name}: stage {part} is incomplete")
        self._cache[name] = cache

    # --- model states -----------------------------------------------------------------
    def concept_factors(self, name: str) -> Factors:
        """``{layer: (up [out, r], down [r, in])}`` of a concept (convolutions flattened to
        im2col form; a layer the package does not adapt gets a zero rank-1 update)."""
        lora = self.packages[name].lora
        device = self.base.device
        text_alpha, unet_alpha = self.alphas.get(name, (1.0, 1.0))
        out: Factors = {}
        for key, layer in self.layers.items():
            if f"{key}.lora_A.weight" not in lora:
                out[key] = (
                    torch.zeros(layer.out_features, 1, device=device),
                    torch.zeros(1, layer.in_features, device=device),
                )
                continue
            up, down = lora[f"{key}.lora_B.weight"], lora[f"{key}.lora_A.weight"]
            alpha = text_alpha if self.part_of[key] == "text" else unet_alpha
            up = up.reshape(up.shape[0], -1).to(device, torch.float32)
            out[key] = (
                up if alpha == 1.0 else alpha * up,
                down.reshape(down.shape[0], -1).to(device, torch.float32),
            )
        return out

    def apply(self, factors: Factors | None, parts: Sequence[str] = PARTS) -> None:
        """Set the adapters of ``parts`` to ``factors`` (``None``: the plain base there)."""
        for key, layer in self.layers.items():
            if self.part_of[key] in parts:
                if factors is None:
                    layer.set_factors(None, None)
                else:
                    up, down = factors[key]
                    layer.set_factors(up.float(), down.float())

    def _groups(self) -> dict[str, Group]:
        groups: dict[str, Group] = {}
        for prefix, model, targets in self.base.lora_components(conv=self.conv):
            for name in target_layer_names(model, targets):
                leaf = next(t for t in targets if name == t or name.endswith("." + t))
                parent = name[: -len(leaf) - 1]
                key = f"{prefix}.{parent}.{_role(leaf, parent)}"
                target = f"{prefix}.{name}"
                if key not in groups:
                    groups[key] = Group(key, self.part_of[target], model.get_submodule(name), [])
                groups[key].targets.append(target)
        return groups

    def recorder(
        self,
        part: str,
        groups: int = 1,
        reduce: dict[str, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> GramRecorder:
        dtype = torch.float64 if self.config.gram_dtype == "float64" else torch.float32
        hooks = {k: g.hook for k, g in self.groups.items() if g.part == part}
        keep_raw = self.config.solver == "lbfgs"
        return GramRecorder(
            hooks, dtype=dtype, keep_raw=keep_raw, groups=groups, reduce=reduce, positions=positions
        )

    @property
    def stage4_samples(self) -> int:
        """Images sampled per concept in stage 4 (``FusionConfig.samples``)."""
        if self.config.samples:
            return self.config.samples
        return CONV_SAMPLES if self.conv else 1

    # --- recording --------------------------------------------------------------------
    def prompts_of(self, name: str) -> list[str]:
        """The fusion prompts of a concept ("photo of a <dog1>", "<dog1>")."""
        token = self.packages[name].concept.token
        return [p.format(token) for p in self.config.text_prompts]

    def concept_prompt_features(self, name: str, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoding of the concept's prompts ``[P, L, tokens, dim]`` with the adapters
        as set, and the ``[P, tokens]`` mask of the positions ``which`` selects (``kv_positions``)."""
        concept = self.packages[name].concept
        prompts = self.prompts_of(name)
        tok = self.base.tokenizer
        hidden = encode_prompts(self.base.text, prompts, self.table, self.num_layers)
        ids = tokenize(tok, [self.table.expand(p, self.num_layers)[0] for p in prompts])
        concept_ids = torch.tensor(concept_token_ids(tok, concept))
        positions = kv_positions(ids, concept_ids, tok.eos_token_id, which)
        return hidden, positions.to(hidden.device)

    def apply_batched(self, factors: Sequence[Factors], parts: Sequence[str]) -> None:
        """Batch chunk ``k`` runs with ``factors[k]`` in ``parts`` (see ``LoRALinear.set_batched``)."""
        for key, layer in self.layers.items():
            if self.part_of[key] in parts:
                layer.set_batched([f[key][0] for f in factors], [f[key][1] for f in factors])

    def _stacked_downs(self, part: str, own: list[Factors]) -> tuple[dict[str, torch.Tensor], int]:
        """Per group, the chunk's down factors of all its targets: ``[K, m * r_max, d]``."""
        r = max(f[t][1].shape[0] for f in own for t in f)
        stacked = {}
        for group in self.groups.values():
            if group.part != part:
                continue
            d = own[0][group.targets[0]][1].shape[1]
            m = len(group.targets)
            out = torch.zeros(len(own), m * r, d, device=self.base.device)
            for k, f in enumerate(own):
                for j, t in enumerate(group.targets):
                    a = f[t][1]
                    out[k, j * r : j * r + a.shape[0]] = a
            stacked[group.key] = out
        return stacked, r

    def _contributions(
        self, stage: SolvedStage, names: list[str], own: list[Factors], upstream: Factors | None
    ) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]]:
        """Per chunk of concepts: ``(count, {group: sum of G_i}, {target: [C_i = A_i G_i]})``.

        Sequential exact fusion of stage 4 reduces while recording (no per-concept Gram
        matrix exists); otherwise per-concept Gram matrices are recorded (or taken from the
        independent-mode cache, where they are kept) and reduced here.
        """
        part = stage.part
        batch = stage.batch(self.config)
        groups = [g for g in self.groups.values() if g.part == part]
        device = self.base.device
        for start in range(0, len(names), batch):
            chunk, chunk_own = names[start : start + batch], own[start : start + batch]
            totals: dict[str, torch.Tensor] = {}
            crosses: dict[str, list[torch.Tensor]] = {t: [] for g in groups for t in g.targets}
            if stage.reduces(self.config):
                stacked, r = self._stacked_downs(part, chunk_own)
                rec = stage.record(self, chunk, upstream, stacked)
                for group in groups:
                    totals[group.key] = rec.grams[group.key]
                    for j, t in enumerate(group.targets):
                        for k, f in enumerate(chunk_own):
                            rank = f[t][1].shape[0]
                            crosses[t].append(rec.crosses[group.key][k, j * r : j * r + rank])
                yield len(chunk), totals, crosses
                continue
            missing = [n for n in chunk if part not in self._cache.get(n, {})]
            recorded: dict[str, dict[str, torch.Tensor]] = {}
            if missing:
                rec = stage.record(self, missing, upstream)
                if rec.keep_raw:
                    self._raw.setdefault(missing[0], {}).update(rec.raw)
                for i, n in enumerate(missing):
                    recorded[n] = {k: (g[i] if rec.groups > 1 else g) for k, g in rec.grams.items()}
                    if self.config.mode == "independent":
                        self._cache.setdefault(n, {})[part] = {
                            k: g.cpu() for k, g in recorded[n].items()
                        }
            for n, f in zip(chunk, chunk_own, strict=True):
                grams = recorded.pop(n) if n in recorded else self._cache[n][part]
                for group in groups:
                    g = grams[group.key].to(device)
                    totals[group.key] = totals[group.key] + g if group.key in totals else g.clone()
                    for t in group.targets:
                        crosses[t].append(cross_term(f[t][1], g))
            yield len(chunk), totals, crosses

    def _solve_stage(
        self, stage: SolvedStage, names: list[str], upstream: Factors | None, bar
    ) -> tuple[Factors, float, float]:
        """Record (or reuse) every concept's statistics for ``stage`` and solve each layer.

        Statistics are streamed: per layer only the total Gram matrix and each concept's
        ``C_i = A_i G_i`` (rank x d) are kept, so device memory does not grow with the number
        of concepts beyond those thin matrices. Returns the factors, their objective, and the
        objective weight fusion would have on the same statistics.
        """
        part = stage.part
        groups = [g for g in self.groups.values() if g.part == part]
        totals: dict[str, torch.Tensor] = {}
        crosses: dict[str, list[torch.Tensor]] = {t: [] for g in groups for t in g.targets}
        concept_factors = [self.concept_factors(n) for n in names]
        for count, chunk_totals, chunk_crosses in self._contributions(
            stage, names, concept_factors, upstream
        ):
            for key, g in chunk_totals.items():
                if key in totals:
                    totals[key] += g
                else:
                    totals[key] = g
            for t, cs in chunk_crosses.items():
                crosses[t].extend(cs)
            bar.update(count)
        device = self.base.device
        factors: Factors = {}
        total_obj = baseline_obj = 0.0
        ran: list[int] = []  # L-BFGS iterations per layer
        for group in groups:
            total = totals.pop(group.key)
            for target in group.targets:
                ups = [cf[target][0] for cf in concept_factors]
                downs = [cf[target][1] for cf in concept_factors]
                if self.config.solver == "exact":
                    toward = downs if self.config.ridge_target == "average" else None
                    new_downs = solve_downs(total, crosses[target], self.config.ridge, toward)
                    up = torch.cat([b.to(total.dtype) for b in ups], dim=1)
                    down = torch.cat(new_downs, dim=0)
                else:
                    iters = (
                        self.config.lbfgs_iterations_unet
                        if part == "spatial"
                        else self.config.lbfgs_iterations_text
                    )
                    feats = [torch.cat(self._raw[n][group.key]) for n in names]
                    run = lbfgs_reference(feats, ups, downs, iters, device=device)
                    ran.append(run.iterations)
                    up = run.delta.double()
                    delta = run.delta
                    down = torch.eye(delta.shape[1], dtype=torch.float64, device=device)
                factors[target] = (up, down)
                stats = (total, ups, downs, crosses[target])
                total_obj += objective_from_stats(up, down, *stats)
                wf_up, wf_down = weight_fusion_factors(ups, downs)
                baseline_obj += objective_from_stats(wf_up, wf_down, *stats)
        if ran:
            log.info("L-BFGS on %d %s layers: %d-%d iterations", len(ran), part, min(ran), max(ran))
        return factors, total_obj, baseline_obj

    def fuse(self, progress: bool = True) -> FusionResult:
        """Gradient fusion of every attached concept (statistics reused where still valid):
        ``TokenStage``, then each of ``self.stages`` in order (``server/stages.py``)."""
        names = self.names
        if not names:
            raise ValueError("no concepts to fuse")
        independent = self.config.mode == "independent"
        timings: dict[str, float] = {}
        objectives: dict[str, float] = {}
        factors: Factors = {}
        start = time.perf_counter()
        self.tokens.run(self, names)
        timings[self.tokens.name] = time.perf_counter() - start
        bar = tqdm(
            total=len(self.stages) * len(names), desc="fusing", disable=None if progress else True
        )
        try:
            for stage in self.stages:
                start = time.perf_counter()
                # sequential: later stages run the concept models with the fused earlier ones
                upstream = None if independent else factors
                part_factors, obj, baseline = self._solve_stage(stage, names, upstream, bar)
                factors.update(part_factors)
                timings[stage.part] = time.perf_counter() - start
                objectives[stage.part] = obj
                objectives[f"{stage.part} (weight fusion)"] = baseline
                log.info(
                    "stage %s (%s): %d concepts, %.2f s, objective %.4g (%.3g of weight "
                    "fusion's %.4g)",
                    stage.part,
                    stage.name,
                    len(names),
                    timings[stage.part],
                    obj,
                    obj / baseline if baseline > 0 else 0.0,
                    baseline,
                )
        finally:
            bar.close()
            if not independent:
                self._raw.clear()
        return FusionResult("gradient-fusion", factors, timings, objectives)

    def weight_fusion(self, weights: Sequence[float] | None = None) -> FusionResult:
        """The baseline: ``W0 + sum_i w_i dW_i`` (``w_i = 1/n`` unless given)."""
        start = time.perf_counter()
        concept_factors = [self.concept_factors(n) for n in self.names]
        factors = {
            key: weight_fusion_factors(
                [cf[key][0] for cf in concept_factors],
                [cf[key][1] for cf in concept_factors],
                weights,
            )
            for key in self.layers
        }
        return FusionResult("weight-fusion", factors, {"total": time.perf_counter() - start})
