"""PAINT: "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language
Model" (Arif et al., arXiv 2501.12206 v1; v2/v3 renamed "PAINT: Paying Attention to INformed
Tokens"). PAI's pre-softmax gain, applied only to two sets of image tokens chosen per image from
the vision tower's own CLS attention, with one gain per set.

Reference: the official code, hasanar1f/PAINT @ 2a9e8f821536531adcc03807f3850a3ab6231443 (a fork
of LALBJ/PAI): `modPAI/llava/model/multimodal_encoder/clip_encoder.py` (`get_top_ratio`,
`spatial_attention_top_tokens`, the call in `CLIPVisionTower.forward`: the selection),
`modPAI/attention.py` (`llama_new_forward`, `llama_modify`: the edit), `modPAI/chair_eval.py` and
`modPAI/CFG.py` (how the reported runs decode). Numbers: v1 Table 1 (CHAIR only, LLaVA-1.5-7B),
"Ours" = alpha 0.7, beta 0.4, local 25 %, spatial 0, with PAI's CFG (gamma 1.1); there are no
POPE numbers for this method.

Selection, once per image, during the prefill forward (the vision tower runs in it). Every
statistic is a softmax row of the CLIP ViT's own attention (CLS = token 0, P patches), recomputed
here from the layer's q/k projections (a look-only vision hook: nothing is cut), never the LLM's:
1. local ("informative") tokens [reference]: the top int(P * local_ratio) patches by the CLS
   query row of ViT layer `local_layer` (0), softmax over all tokens, summed over heads.
2. spatial tokens, stream 2 (`spatial_ratio`; 0 = off, as in the reported "Ours"): the top
   int(P * spatial_ratio) patches by a statistic of the head-mean attention of the same layer,
   added to the local set. The reference sums each query's row (about 1 for every token: the
   ranking is rounding noise) and uses token indices 0..P, CLS included, as patch indices
   (`spatial_stat="legacy"`; its index P, which lands on the first text token after the image
   there, is dropped here). "received" (default, ours) ranks the attention each patch receives
   (column sum over every query row), the statistic the reference evidently meant.
3. summary tokens [reference]: patches whose CLS-row score (summed over heads) at
   `summary_layer` exceeds Q3 + iqr_k * (Q3 - Q1) (linear percentiles as numpy's, strict >).
   The reference reads `attentions[-2]`, ViT layer 22 of 24, the layer LLaVA-1.5 reads
   (`vision_feature_layer=-2`); the default "read" is the layer the LLM reads on any model.
   `summary_top_k` (ours) takes that many top patches instead of the outliers.
4. local = local minus summary [reference: `exclude_summary_from_local`]; with False the two
   sets may overlap and a token in both gets alpha, then beta on the result (the reference's
   order).
Ties rank the lower patch first (stable sort); the reference ranks fp16 sums with `topk` (its
order among ties is unspecified). `selection_dtype="model"` sums the heads' probabilities in the
tower's dtype (fp16 in the reference) instead of fp32.

Edit [reference]: in LLM layers [start_layer, end_layer), every head, the last query row only,
a local token's pre-softmax score s becomes s + alpha*|s| and a summary token's s + beta*|s| (so
it always rises), after the scaling and before the softmax; every other column is untouched.
32 layers [2, 32) on LLaVA-1.5-7B map to [2, L) on an L-layer model (the first two layers are
skipped whatever the depth, as in `pai.py`); the 4-layer gym model edits layers 2 and 3.
The sets are fixed for the whole generation; each decode step edits its one query row.
- `edit_first_token` (default False): the reported runs used PAI's `--use-cfg`, under which the
  patched attention leaves the prefill unedited, so the first token is plain and steps 2, 3, ...
  are edited (as `pai.py`'s edit_first_token=False). True = the code's flow without CFG.
- PAI's CFG: compose with `pai_cfg` (gamma 1.1, cutoff 0.1, its text-only row unedited) to
  reproduce the tables; this method is the attention edit alone.
- `head_modulation`: the v1 abstract claims heads are amplified "based on measured visual
  sensitivity"; no commit of the code does it (every head gets the same gain) and v2/v3 drop the
  claim. "none" (default) = the code and the reported numbers. "sensitivity" is OUR
  reconstruction: per sample and edited layer, each head's attention mass on the image columns
  of the prefill's last row (stock probabilities, before this layer's edit) divided by the
  mean over heads, clipped to [0, 2], multiplies both gains of that head; fixed after prefill.

Ours, beyond the reference: sets are chosen per image and per row (the reference uses batch item
0 for the whole batch; it ran with batch size 1, so the results agree there); rows of several
images take each image's own sets; rows that are not edited (PAI-CFG's text-only row, VHR's
counterfactual) get no gain; layers pruned by FastV/DyVTE see the gains of the columns they
kept; FastV's per-step mode re-runs each step as a prefill, whose last row is then edited.

Why a score modifier: the built-in PAI fields give one gain per row and head over the image
columns (`image_gain` [R, H] on col_group >= 2); two gains on two column sets per row cannot be
stated with them (and re-marking col_group would clash with VAR's sink groups). The modifier runs
on the plain-torch path, so requests decode in a lane of their own (`shared_decode=False` says so
up front: the engine's shared tables could not hold the edit anyway).

Models: LLaVA-1.5 only. LLaVA-NeXT (anyres) is refused: choosing on the base view would need
to know which tower crops belong to which image (the crop counts come from the model's
`image_grid_pinpoints`, which a hook cannot see). OneVision is refused: SigLIP has no CLS token.
Conflicts: `flowcut` (one vision hook per plan: the plan compiler refuses it) and `pai` (this
method replaces PAI's gain on all image tokens; both would stack two gains).

State: "paint.gain" float32 [R, S] (per row, each prompt column's gain; alpha on local, beta on
summary, 0 elsewhere; width 0 when no row holds an image), "paint.gain_again" [R, S] (only with
overlapping sets: beta applied after alpha), "paint.head_gain" [R, L, H] (head modulation only).
Scratch (one prefill forward): "paint.local", "paint.summary", "paint.spatial" [N, P] and
"paint.image_gain" [n_passes, N, T] (T = the image's tokens in the LLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from lvlm_fix.methods.base import Contribution, Intervention, layer_range, register
from lvlm_fix.model import ModelInfo

if TYPE_CHECKING:
    from lvlm_fix.hooks import AttentionCall, ForwardContext, VisionLayerCall


@register
class PAINT(Intervention):
    """PAI's gain on informative (local) and summary image tokens chosen from CLIP's attention."""

    name: ClassVar[str] = "paint"
    hooks: ClassVar[frozenset] = frozenset({"vision", "attention"})
    conflicts: ClassVar[frozenset[str]] = frozenset({"pai"})

    alpha: float = Field(
        0.7, ge=0.0, le=100.0, description="Local-token score gain s + alpha*|s| (0 = off)."
    )
    beta: float = Field(
        0.4,
        ge=0.0,
        le=100.0,
        description="Summary-token score gain s + beta*|s| (0 = off; Table 1's 0.4, code 0.3).",
    )
    local_ratio: float = Field(
        0.25, ge=0.0, le=1.0, description="Local tokens: this share of the patches (144 of 576)."
    )
    local_layer: int = Field(
        0,
        ge=-1024,
        le=1024,
        description="ViT layer whose CLS row ranks local (and spatial) tokens; < 0 from the depth.",
    )
    summary_layer: Annotated[int, Field(ge=-1024, le=1024)] | Literal["read"] = Field(
        "read",
        description="ViT layer whose CLS row finds summary tokens: 'read' = the layer the LLM "
        "reads (the reference's -2 on LLaVA-1.5); an int, < 0 from the depth.",
    )
    iqr_k: float = Field(
        1.5, ge=0.0, le=100.0, description="Summary tokens: score > Q3 + iqr_k * (Q3 - Q1)."
    )
    summary_top_k: int | None = Field(
        None,
        ge=0,
        le=1 << 20,
        description="None = the IQR outliers (reference); k = the top k patches instead (ours).",
    )
    exclude_summary_from_local: bool = Field(
        True, description="Local = local minus summary (reference); False = sets may overlap."
    )
    spatial_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Spatial tokens added to local: share of patches (0=off)."
    )
    spatial_stat: Literal["received", "legacy"] = Field(
        "received",
        description="'received' = attention each patch receives (ours); 'legacy' = the code's "
        "row sums with unshifted indices (near-random).",
    )
    start_layer: int = Field(2, ge=0, le=1024, description="First edited LLM layer (reference 2).")
    end_layer: int | None = Field(
        None,
        ge=-1024,
        le=1024,
        description="Edited layers end before this; None = the model's depth, < 0 from it.",
    )
    edit_first_token: bool = Field(
        False,
        description="Edit the prefill's last row; False = the reported (CFG) runs, True = the "
        "code without CFG.",
    )
    head_modulation: Literal["none", "sensitivity"] = Field(
        "none",
        description="'none' = one gain for every head (code, reported); 'sensitivity' = ours, "
        "gain x head's image mass / head mean, clipped to [0, 2].",
    )
    selection_dtype: Literal["float32", "model"] = Field(
        "float32", description="Dtype of the head sums that rank tokens ('model': the tower's)."
    )

    def is_neutral(self) -> bool:
        return self.alpha == 0 and self.beta == 0

    def contribute(self, model: ModelInfo) -> Contribution:
        if model.family != "llava":
            why = {
                "llava_next": "its anyres crops cannot be mapped to their images from a vision "
                "hook (no base-view selection)",
                "llava_onevision": "its SigLIP tower has no CLS token to rank patches with",
            }.get(model.family, "the reference is LLaVA-1.5 only")
            raise ValueError(f"paint supports LLaVA-1.5, not {model.family!r}: {why}")
        layers = layer_range("paint", self.start_layer, self.end_layer, model.num_layers)
        selection = TokenSelection(
            local_layer=self.local_layer,
            summary_layer=None if self.summary_layer == "read" else self.summary_layer,
            local_ratio=self.local_ratio,
            spatial_ratio=self.spatial_ratio,
            spatial_stat=self.spatial_stat,
            iqr_k=self.iqr_k,
            summary_top_k=self.summary_top_k,
            exclude_summary=self.exclude_summary_from_local,
            alpha=self.alpha,
            beta=self.beta,
            model_dtype=self.selection_dtype == "model",
        )
        gain = ChosenTokenGain(
            layers=layers,
            edit_prefill=self.edit_first_token,
            sensitivity=self.head_modulation == "sensitivity",
        )
        return Contribution(vision=selection, attention=gain, shared_decode=False)


# ---------------------------------------------------------------- selection (vision tower)


def vit_attention(call: VisionLayerCall, every_row: bool) -> torch.Tensor:
    """fp32 [N, H, 1 or n, n]: this ViT layer's attention probabilities of the CLS query row (or
    of every query row), softmax over all n tokens, from the layer's own q/k projections."""
    q, k, _ = call.heads()  # [N, H, n, d]
    q = q if every_row else q[:, :, :1]
    return (q @ k.transpose(-1, -2)).softmax(-1)  # one vision hook a plan: nothing cut, no padding


def head_sum(probs: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """[N, H, n] -> fp32 [N, n]: summed over heads (in `dtype` first, when given)."""
    return (probs if dtype is None else probs.to(dtype)).sum(1).float()


def top_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """bool [N, m]: the `count` highest entries of each row (ties: the lower index first)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    chosen = torch.zeros_like(score, dtype=torch.bool)
    return chosen.scatter_(1, order[:, :count], True)


def iqr_outliers(score: torch.Tensor, k: float) -> torch.Tensor:
    """bool [N, m]: score > Q3 + k * (Q3 - Q1) per row (numpy's linear percentiles)."""
    q1, q3 = torch.quantile(score, torch.tensor([0.25, 0.75], device=score.device), dim=-1)
    return score > (q3 + k * (q3 - q1))[:, None]


def spatial_score(probs: torch.Tensor, stat: str) -> torch.Tensor:
    """Every query row's attention [N, H, n, n] -> fp32 [N, P] spatial score of each patch.

    "received": the head-mean attention each patch receives, summed over every query row.
    "legacy": the reference's row sums (about 1 each) of tokens 0..P-1, CLS included, taken as
    patch indices without the CLS shift (token P, past the image there, is dropped by the caller).
    """
    mean = probs.mean(1)  # [N, n, n]
    if stat == "received":
        return mean[:, :, 1:].sum(1)
    return mean.sum(-1)  # [N, n]: token i's row sum stands for patch i


def choose(
    local: torch.Tensor,
    summary: torch.Tensor,
    spatial: torch.Tensor | None,
    hook: TokenSelection,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image scores [N, P] -> (local bool [N, P], summary bool [N, P]), per the module notes.

    spatial: [N, P] ("received") or [N, P + 1] ("legacy"), None when the stream is off."""
    patches = local.shape[1]
    chosen = top_mask(local, int(patches * hook.local_ratio))
    if spatial is not None:
        extra = top_mask(spatial, int(patches * hook.spatial_ratio))[:, :patches]
        chosen = chosen | extra
    if hook.summary_top_k is None:
        sink = iqr_outliers(summary, hook.iqr_k)
    else:
        sink = top_mask(summary, min(hook.summary_top_k, patches))
    if hook.exclude_summary:
        chosen = chosen & ~sink
    return chosen, sink


@dataclass(frozen=True)
class TokenSelection:
    """VisionHook, look-only (budget None): scores the patches of each image at the ViT layers it
    needs and leaves per-image gains in the forward's scratch for `ChosenTokenGain`."""

    local_layer: int
    summary_layer: int | None  # None: the layer the LLM reads
    local_ratio: float
    spatial_ratio: float
    spatial_stat: str
    iqr_k: float
    summary_top_k: int | None
    exclude_summary: bool
    alpha: float
    beta: float
    model_dtype: bool
    budget: None = None  # never cuts
    grid: None = None

    def layers(self, call: VisionLayerCall) -> tuple[int, int]:
        """(local layer, summary layer) as indices of this tower."""
        n = call.num_layers
        if self.summary_layer is None and call.read_layer < 0:
            raise ValueError("paint's summary_layer='read' needs a single vision_feature_layer")
        summary = call.read_layer if self.summary_layer is None else self.summary_layer
        local, summary = (x + n if x < 0 else x for x in (self.local_layer, summary))
        if not (0 <= local < n and 0 <= summary < n):
            raise ValueError(
                f"paint's vision layers (local {self.local_layer}, summary {self.summary_layer})"
                f" are not in the tower's {n} layers"
            )
        return local, summary

    def after_layer(self, call: VisionLayerCall) -> None:
        local_at, summary_at = self.layers(call)
        if call.layer not in (local_at, summary_at):
            return None
        scratch = call.ctx.scratch
        spatial = call.layer == local_at and self.spatial_ratio > 0
        probs = vit_attention(call, every_row=spatial)  # [N, H, 1 or n, n]
        score = head_sum(probs[:, :, 0], call.hidden_out.dtype if self.model_dtype else None)
        if call.layer == local_at:
            scratch["paint.local"] = score[:, 1:]  # patches only
            if spatial:
                scratch["paint.spatial"] = spatial_score(probs, self.spatial_stat)
        if call.layer == summary_at:
            scratch["paint.summary"] = score[:, 1:]
        if call.layer == max(local_at, summary_at):
            local, sink = choose(
                scratch.pop("paint.local"),
                scratch.pop("paint.summary"),
                scratch.pop("paint.spatial", None),
                self,
            )
            scratch["paint.image_gain"] = self.gains(local, sink, call.keeps_cls)
        return None

    def gains(self, local: torch.Tensor, sink: torch.Tensor, keeps_cls: bool) -> torch.Tensor:
        """float32 [passes, N, T]: each image token's gain per pass (T = tokens the LLM gets:
        the patches, CLS first with gain 0 when the LLM reads it). One pass unless the sets
        overlap (then beta again on the overlap, after alpha)."""
        zero = torch.zeros_like(local, dtype=torch.float32)
        first = torch.where(local, self.alpha, torch.where(sink, self.beta, zero))
        passes = [first]
        if not self.exclude_summary:
            passes.append(torch.where(local & sink, self.beta, zero))
        out = torch.stack(passes)
        if keeps_cls:
            out = torch.nn.functional.pad(out, (1, 0))
        return out


# ---------------------------------------------------------------- the edit (LLM attention)


@dataclass(frozen=True)
class LastRowColumnGain:
    """Score modifier: s + g*|s| on each row's last query row, g = gain[b, column] (x head[b, h]);
    the passes apply in order. Columns past a gain's width get nothing."""

    gains: tuple[torch.Tensor, ...]  # float32 [B, G] each
    head: torch.Tensor | None = None  # float32 [B, H]

    def __call__(self, x, b, h, q_idx, kv_idx):
        width = x.shape[-1]
        last = q_idx == q_idx.amax(2, keepdim=True)  # [B or 1, 1, Q, 1]
        for gain in self.gains:
            gain = torch.nn.functional.pad(gain[:, :width], (0, max(width - gain.shape[1], 0)))
            g = gain[b, kv_idx]  # [B, 1, 1, K]
            if self.head is not None:
                g = g * self.head[b, h]  # [B, H, 1, K]
            x = torch.where(last & (g != 0), x + g * x.abs(), x)
        return x


def _rerun(ctx: ForwardContext) -> bool:
    """A recomputed decode step (FastV per step): a prefill whose last row is a generated token."""
    fed = ctx.state.get("rerun.tokens")
    return fed is not None and fed.shape[1] > 0


@dataclass(frozen=True)
class ChosenTokenGain:
    """AttentionHook: at prefill turns the vision hook's per-image gains into per-row column gains
    (state "paint.gain"), then edits the last query row of the chosen layers."""

    layers: frozenset[int]
    edit_prefill: bool  # the prefill's last row, whose logits give the first token
    sensitivity: bool  # head modulation by each head's image mass (ours)

    def edits(self, call: AttentionCall) -> dict[str, Any] | None:
        ctx, state = call.ctx, call.ctx.state
        if ctx.phase == "prefill":
            fresh = ctx.scratch.pop("paint.image_gain", None)
            if fresh is not None or "paint.gain" not in state:
                self._build(call, fresh)
        if call.layer not in self.layers or state["paint.gain"].shape[1] == 0:
            return None
        if ctx.phase == "prefill":
            if self.sensitivity:
                self._measure(call)
            if not (self.edit_prefill or _rerun(ctx)):
                return None
        columns = ctx.layout.columns_at(call.layer)  # pruned layers hold some prompt columns
        keys = ("paint.gain", "paint.gain_again")
        gains = tuple(_kept(state[key], columns) for key in keys if key in state)
        head = state["paint.head_gain"][:, call.layer] if self.sensitivity else None
        return {"score_mods": (LastRowColumnGain(gains, head),)}

    def after(self, call: AttentionCall, out: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        return None

    def _build(self, call: AttentionCall, fresh: torch.Tensor | None) -> None:
        """state "paint.gain" [R, S] from per-image gains [passes, N, T] (images in row order,
        each image's T tokens in order among its row's image columns)."""
        ctx, state = call.ctx, call.ctx.state
        image = ctx.layout.image_mask  # [R, S], prompt columns
        rows, _ = image.shape
        total = int(image.sum())  # the one host sync of the build
        if fresh is None:
            if total:
                raise ValueError(
                    "paint: the prompt has image tokens but the vision tower was not seen"
                )
            state["paint.gain"] = image.new_zeros(rows, 0, dtype=torch.float32)
            return
        n_images, tokens = fresh.shape[1:]
        if total != n_images * tokens:
            raise ValueError(
                f"paint: the prompt holds {total} image tokens but the vision tower saw "
                f"{n_images} images of {tokens} tokens"
            )
        edited = state["row.edited"][:, None]
        for name, per_image in zip(("paint.gain", "paint.gain_again"), fresh, strict=False):
            gain = image.new_zeros(image.shape, dtype=torch.float32)
            gain[image] = per_image.flatten()
            state[name] = gain * edited
        if self.sensitivity:
            heads = call.query.shape[1]
            state["paint.head_gain"] = torch.ones(
                rows, ctx.num_layers, heads, dtype=torch.float32, device=image.device
            )

    def _measure(self, call: AttentionCall) -> None:
        """Head modulation (ours): each head's stock attention mass on the image columns of the
        prefill's last row, over the heads' mean, clipped to [0, 2]."""
        last = torch.tensor([call.query.shape[2] - 1], device=call.query.device)
        probs = call.probabilities(last)[:, :, 0]  # [R, H, K]
        mass = (probs * call.image_columns()[:, None]).sum(-1)  # [R, H]
        mean = mass.mean(-1, keepdim=True)
        ratio = torch.where(mean > 0, mass / mean.clamp_min(1e-30), 0.0).clamp(0.0, 2.0)
        call.ctx.state.write("paint.head_gain", (slice(None), call.layer), ratio)


def _kept(gain: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """A prompt-wide gain [R, S] as a layer sees it: its kept columns [R, W] (-1 = filler)."""
    if columns is None:
        return gain
    return gain.gather(1, columns.clamp(min=0)) * (columns >= 0)
