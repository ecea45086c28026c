"""VAR, VHR and PAI on tiny LLaVA / NeXT / OneVision models: the spec's invariants.

Random tiny weights have no real massive activations, so VAR gets explicit sink dims and a low
tau here (which gives both text and visual sinks at layers 2 and 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import Runner, build_rows
from lvlm_fix.hooks import AttentionCall
from lvlm_fix.methods import Contribution, Intervention
from lvlm_fix.methods.base import RowState
from lvlm_fix.methods.var import VAR, discover_sink_dims, resolve_sink_dims
from lvlm_fix.methods.vhr import reinforced_layers, select_heads
from lvlm_fix.model import FAMILIES, ModelInfo, resolve

QUESTIONS = ["describe this", "what color is the star in the picture on the left"]
VAR_TINY = {"name": "var", "sink_dims": list(range(8)), "tau": 2.0}
# Loose thresholds so that many heads are selected on random weights.
VAR_OPEN = {**VAR_TINY, "max_sink_share": 1.0, "min_image_mass": 0.0}
ALL_THREE = [VAR_TINY, {"name": "vhr"}, {"name": "pai", "alpha": 1.0}]


@pytest.fixture(scope="module")
def lvlms(tiny_paths) -> dict[str, LVLM]:
    return {family: LVLM.from_pretrained(path) for family, path in tiny_paths.items()}


@pytest.fixture(scope="module")
def samples(images) -> list[Sample]:
    return [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]


@dataclass
class ProbeHook:
    """Asks the kernel for the last row's probabilities at one layer."""

    layer: int
    records: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def edits(self, call):
        if call.layer == self.layer and call.ctx.phase == "prefill":
            return {"want_last_row": True}
        return None

    def after(self, call, out, stats):
        if call.layer == self.layer and call.ctx.phase == "prefill":
            self.records.append({k: v.clone() for k, v in stats.items()})


class Probe(Intervention):
    """A real (test-only) intervention that records attention statistics, editing nothing."""

    name: ClassVar[str] = "test_probe"
    hooks: ClassVar[frozenset] = frozenset({"attention"})
    layer: int = 2

    def contribute(self, model) -> Contribution:
        return Contribution(attention=ProbeHook(self.layer))


def prefill(lvlm: LVLM, samples, interventions) -> tuple[Runner, torch.Tensor]:
    """Build the rows and run the prefill forward; returns the runner (its state) and logits."""
    plan = lvlm.plan(interventions)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    state = RowState.start(plan.views, len(samples), lvlm.device)
    runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers)
    return runner, runner.prefill()


def probe_records(runner: Runner) -> dict[str, torch.Tensor]:
    [hook] = [h for h in runner.plan.attention_hooks if isinstance(h, ProbeHook)]
    [record] = hook.records
    return record


def capture_o_proj_input(lvlm: LVLM, layer: int, store: list[torch.Tensor]):
    """Test-side torch hook: the concatenated head outputs entering o_proj of one layer."""
    layers = resolve(lvlm.model, FAMILIES[lvlm.family].decoder_layers)
    return layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: store.append(args[0].detach().clone())
    )


# ---------------------------------------------------------------- neutral settings


def test_neutral_strengths_change_nothing(lvlms, samples):
    lvlm = lvlms["llava"]
    neutral = [
        {"name": "vhr", "alpha": 1.0},
        {**VAR_TINY, "recycle_fraction": 0.0},
        {"name": "pai", "alpha": 0.0},
    ]
    plan = lvlm.plan(neutral)
    assert plan.attention_hooks == () and plan.views == () and plan.layer_input_hooks == ()
    params = GenerationParams(max_new_tokens=8)
    base = lvlm.generate(samples, params=params)
    assert [g.token_ids for g in lvlm.generate(samples, neutral, params)] == [
        g.token_ids for g in base
    ]
    _, base_logits = prefill(lvlm, samples, [])
    _, neutral_logits = prefill(lvlm, samples, neutral)
    assert torch.equal(base_logits, neutral_logits)


# ---------------------------------------------------------------- VHR


def test_vhr_scales_only_selected_heads(lvlms, samples):
    """Layer 1 is the first reinforced layer: its input equals the plain model's, so the
    head outputs entering o_proj are exactly the plain ones times the head scale, at prefill
    (all rows) and at the first decode step (through the kernel's epilogue)."""
    lvlm = lvlms["llava"]
    H, D = lvlm.info.num_heads, lvlm.info.head_dim
    plain, edited = [], []
    handle = capture_o_proj_input(lvlm, 1, plain)
    base, _ = prefill(lvlm, samples, [])
    base.forward(torch.tensor([[5], [6]]))
    handle.remove()
    handle = capture_o_proj_input(lvlm, 1, edited)
    runner, _ = prefill(lvlm, samples, [{"name": "vhr", "alpha": 2.0}])
    state = runner.state
    scale = state["vhr.head_scale"]  # [R, L, H], rows: s0, s0 text-only, s1, s1 text-only
    assert set(scale.unique().tolist()) <= {1.0, 2.0}
    assert scale[:, 0].eq(1).all() and scale[0, 1].eq(2).any()
    assert (scale[:, 1] == 2).sum(-1).le(H // 2).all()
    assert torch.equal(scale[0::2, 1], scale[1::2, 1])  # both branches share the scale
    originals = state["row.view"] == 0
    got = edited[0][originals].view(2, -1, H, D)
    expected = plain[0].view(2, -1, H, D) * scale[originals, 1][:, None, :, None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    # decode: drop the text-only rows, feed one token to both.
    kept = originals.nonzero().flatten()
    runner.select_rows(kept)
    runner.forward(torch.tensor([[5], [6]]))
    handle.remove()
    assert torch.equal(runner.state["vhr.head_scale"], scale[kept])  # fixed after prefill
    got = edited[-1].view(2, 1, H, D)
    expected = plain[-1].view(2, 1, H, D) * scale[kept, 1][:, None, :, None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_vhr_selection_rules():
    vhd = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0, 0.6]])
    text_norm = torch.tensor([[1.0, 1.0, 1.0, 1.0, 9.0, 1.0]])
    # no filter: torch.median of 6 values is the lower middle (0.3): 3 heads above it
    assert select_heads(vhd, text_norm, False).tolist() == [[False, False, False, True, True, True]]
    # the filter zeroes head 4 (VHD and text-only norm both surge): median drops to 0.2
    assert select_heads(vhd, text_norm, True).tolist() == [[False, False, True, True, False, True]]
    ties = torch.zeros(1, 4)
    assert not select_heads(ties, ties, True).any()
    assert sorted(reinforced_layers("auto", 32)) == [1, *range(18, 32)]
    assert sorted(reinforced_layers("auto", 4)) == [1, 2, 3]
    with pytest.raises(ValueError, match="do not exist"):
        reinforced_layers([1, 7], 4)


def test_vhr_switches(lvlms, samples):
    lvlm = lvlms["llava"]
    H, D = lvlm.info.num_heads, lvlm.info.head_dim
    plain, last_only = [], []
    handle = capture_o_proj_input(lvlm, 1, plain)
    prefill(lvlm, samples, [])
    handle.remove()
    handle = capture_o_proj_input(lvlm, 1, last_only)
    vhr = {"name": "vhr", "prefill_scope": "last", "vhd_reinforce_counterfactual": False}
    runner, _ = prefill(lvlm, samples, [vhr])
    handle.remove()
    scale = runner.state["vhr.head_scale"][:, 1]  # [R, H]
    assert scale[1::2].eq(1).all() and scale[0::2].eq(2).any()  # text-only rows not scaled
    got = last_only[0][0::2].view(2, -1, H, D)
    want = plain[0].view(2, -1, H, D)
    torch.testing.assert_close(got[:, :-1], want[:, :-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, -1], want[:, -1] * scale[0::2, :, None], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="text_only"):
        lvlm.plan([{"name": "vhr", "text_only": "mask"}])  # not offered: see methods.base


def test_vhr_without_image_is_a_no_op(lvlms):
    lvlm = lvlms["llava"]
    params = GenerationParams(max_new_tokens=6)
    text = [Sample("hello there", ())]
    assert lvlm.generate(text, [{"name": "vhr"}], params)[0].token_ids == (
        lvlm.generate(text, params=params)[0].token_ids
    )
    runner, _ = prefill(lvlm, text, [{"name": "vhr"}])
    assert runner.state["vhr.head_scale"].eq(1).all()


# ---------------------------------------------------------------- VAR


def test_var_redistributes_as_specified(lvlms, samples):
    """At layer 2 (first VAR layer, same input as the plain model), the last row's
    probabilities are the plain ones with sinks x keep and non-sink image x f_U."""
    lvlm = lvlms["llava"]
    keep = 0.6
    base, _ = prefill(lvlm, samples, [Probe()])
    var, _ = prefill(lvlm, samples, [Probe(), {**VAR_OPEN, "recycle_fraction": 1 - keep}])
    p = probe_records(base)["last_row"]  # [R, H, K]
    q = probe_records(var)["last_row"]
    sink = var.state["var.sink_mask"][:, 2]  # [R, S]
    image = var.layout.image_mask
    counts = var.state["var.sink_count"][:, 2]
    assert counts[:, 0].gt(0).all() and counts[:, 1].gt(0).all()  # text and visual sinks
    sink_cols, free_image = sink[:, None, :], (image & ~sink)[:, None, :]
    a_s = (p * sink_cols).sum(-1)
    a_u = (p * free_image).sum(-1)
    selected = a_u > 0  # open thresholds: every row that can receive mass is selected
    assert selected.any()
    f_u = 1 + (1 - keep) * a_s / a_u
    w = torch.where(sink_cols, keep, torch.where(free_image, f_u[..., None], 1.0))
    expected = torch.where(selected[..., None], p * w, p)
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.sum(-1), torch.ones_like(q[..., 0]), rtol=0, atol=1e-5)
    # the image gains exactly the mass taken from text sinks
    a_t = (p * (sink & ~image)[:, None, :]).sum(-1)
    gain = (q * image[:, None, :]).sum(-1) - (p * image[:, None, :]).sum(-1)
    torch.testing.assert_close(gain[selected], ((1 - keep) * a_t)[selected], rtol=1e-4, atol=1e-6)


def test_var_thresholds_and_eligible_rows(lvlms, samples):
    lvlm = lvlms["llava"]
    base, _ = prefill(lvlm, samples, [Probe()])
    strict, _ = prefill(lvlm, samples, [Probe(), {**VAR_TINY, "min_image_mass": 1.5}])
    assert torch.equal(probe_records(base)["last_row"], probe_records(strict)["last_row"])
    # prefill rows up to the last image column are never eligible
    runner, _ = prefill(lvlm, samples, [VAR_OPEN])
    hook = runner.plan.attention_hooks[0]
    ctx = runner._context("prefill")
    S, H, D = runner.layout.image_mask.shape[1], lvlm.info.num_heads, lvlm.info.head_dim
    q = torch.zeros(2, H, S, D)
    call = AttentionCall(2, q, q[:, :1], q[:, :1], 1.0, ctx)
    rows = hook.edits(call)["var_rows"]
    last_image = S - 1 - runner.layout.image_mask.flip(-1).int().argmax(-1)
    for r in range(2):
        assert rows[r, : last_image[r] + 1].sum() == 0 and rows[r, last_image[r] + 1 :].all()
    assert hook.edits(AttentionCall(1, q, q[:, :1], q[:, :1], 1.0, ctx)) is None


def test_var_sink_dims_table_and_discovery(lvlms, samples):
    info = lvlms["llava"].info
    big = ModelInfo("llava", "llama", 32, 32, 32, 128, 4096, 32000, 32000, "x")
    assert resolve_sink_dims("auto", big) == (1415, 2533)
    qwen = ModelInfo("llava_onevision", "qwen2", 28, 28, 4, 128, 3584, 152000, 151646, "x")
    assert resolve_sink_dims("auto", qwen) == (458, 2570)
    assert resolve_sink_dims("auto", info) is None  # tiny model: discover per request
    with pytest.raises(ValueError, match="outside the hidden size"):
        VAR(sink_dims=[info.hidden_size]).contribute(info)
    with pytest.raises(ValueError):
        VAR(sink_dims=[-1])
    lvlm = lvlms["llava"]
    pairs = [(s.text, s.images) for s in samples] + [("hello there", ())]
    tau = 2.0
    dims = discover_sink_dims(lvlm, pairs, tau=tau, min_share=1.0)
    assert dims  # random weights still have a few large channels on the first token
    runner, _ = prefill(lvlm, samples, [{"name": "var", "tau": tau}])
    found = runner.state["var.auto_dims"]  # [R, D]: found per request, union over layers
    assert found[:, dims].all()
    assert runner.state["var.sink_count"][:, 2, 0].gt(0).all()  # the first token is a text sink


def test_var_last_layer_switch(lvlms):
    """The paper leaves the last layer alone; skip_last_layer=False edits it (released code)."""
    lvlm = lvlms["llava"]
    L = lvlm.info.num_layers
    [paper] = lvlm.plan([VAR_TINY]).attention_hooks
    [released] = lvlm.plan([{**VAR_TINY, "skip_last_layer": False}]).attention_hooks
    assert sorted(paper.layers) == list(range(2, L - 1))
    assert sorted(released.layers) == list(range(2, L))


# ---------------------------------------------------------------- PAI


def test_pai_raises_image_mass_on_last_row(lvlms, samples):
    lvlm = lvlms["llava"]
    base, _ = prefill(lvlm, samples, [Probe()])
    pai, _ = prefill(lvlm, samples, [Probe(), {"name": "pai", "alpha": 0.5}])
    p0, p1 = probe_records(base)["last_row"], probe_records(pai)["last_row"]  # [R, H, K]
    image = base.layout.image_mask[:, None, :]
    assert ((p1 * image).sum(-1) > (p0 * image).sum(-1)).all()  # every head of every row
    ratio = p1 / p0.clamp_min(1e-30)  # non-image columns share one factor (renormalisation)
    text = ~image & (p0 > 1e-3)  # tiny probabilities carry no precision for a ratio
    spread = torch.where(text, ratio, -1e9).amax(-1) - torch.where(text, ratio, 1e9).amin(-1)
    assert spread.abs().max() < 1e-4
    early, _ = prefill(lvlm, samples, [Probe(), {"name": "pai", "alpha": 0.5, "start_layer": 3}])
    assert torch.equal(probe_records(early)["last_row"], p0)
    with pytest.raises(ValueError, match="empty"):
        lvlm.plan([{"name": "pai", "start_layer": 3, "end_layer": 2}])


def test_pai_first_token_switch(lvlms, samples):
    """edit_first_token=False (the official --use-attn --use-cfg flow): the first token's logits
    are the unedited run's; the later steps are edited."""
    lvlm = lvlms["llava"]
    base, base_logits = prefill(lvlm, samples, [])
    late, late_logits = prefill(
        lvlm, samples, [{"name": "pai", "alpha": 1.0, "edit_first_token": False}]
    )
    _, paper_logits = prefill(lvlm, samples, [{"name": "pai", "alpha": 1.0}])
    assert torch.equal(late_logits, base_logits)
    assert not torch.allclose(paper_logits, base_logits)  # the default edits the first token
    token = base_logits.argmax(-1, keepdim=True)
    assert not torch.allclose(late.forward(token), base.forward(token))  # step 2 is edited


# ---------------------------------------------------------------- composition


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_all_three_batched_equal_alone(lvlms, samples, family):
    lvlm = lvlms[family]
    params = GenerationParams(max_new_tokens=6)
    together = lvlm.generate(samples, ALL_THREE, params)
    alone = [lvlm.generate([s], ALL_THREE, params)[0] for s in samples]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert together[0].prompt_tokens != together[1].prompt_tokens
    runner, logits = prefill(lvlm, samples, ALL_THREE)
    _, plain = prefill(lvlm, samples, [])
    assert not torch.allclose(logits[0::2], plain)  # the methods really act
    assert runner.state["var.sink_count"][:, 2:, 1].sum() > 0


def test_all_three_with_beams(lvlms, samples):
    lvlm = lvlms["llava"]
    params = GenerationParams(max_new_tokens=5, num_beams=2)
    together = lvlm.generate(samples, ALL_THREE, params)
    alone = [lvlm.generate([s], ALL_THREE, params)[0] for s in samples]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
