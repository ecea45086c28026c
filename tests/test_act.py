"""ACT (attention-sink calibration) on tiny LLaVA / NeXT / OneVision models.

Random tiny weights attend almost uniformly (no column mean reaches ACT's 0.1), so the models
here have their language model's query and key projections scaled by PEAK: attention becomes
peaked and some columns become sinks. The reference's math is checked twice: against a literal
port of `atten_process_eval` (GATECH-EIC/ACT @ a267af7, models/llama_modelling_aug.py) on
random attention maps, and by an eager attention written here that drives a separate copy of
the model step by step, with running column statistics of its own.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from transformers import AttentionInterface, AutoProcessor, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.compat import cache_kwargs
from lvlm_fix.hooks import AttentionCall, ForwardContext
from lvlm_fix.kernels import AttentionEdits, edited_attention
from lvlm_fix.methods import Contribution, Intervention
from lvlm_fix.methods.act import ACT, LLAMA2_CHAT_CLS, calibrated_heads, calibrated_layers
from lvlm_fix.methods.base import RowState
from lvlm_fix.model import FAMILIES, ImageLayout, ModelInfo, render_prompt, resolve
from lvlm_fix.plan import PlanConflict

PEAK = 10.0  # query and key weights x10: scores x100
QUESTIONS = ["describe this", "what color is the star in the picture on the left"]
PARAMS = GenerationParams(max_new_tokens=10)


def peak(model: torch.nn.Module, family: str) -> None:
    with torch.no_grad():
        for layer in resolve(model, FAMILIES[family].decoder_layers):
            layer.self_attn.q_proj.weight.mul_(PEAK)
            layer.self_attn.k_proj.weight.mul_(PEAK)


@pytest.fixture(scope="module")
def lvlms(tiny_paths):
    out = {}
    for family, path in tiny_paths.items():
        out[family] = LVLM.from_pretrained(path)
        peak(out[family].model, family)
    yield out
    for lvlm in out.values():
        lvlm.close()


@pytest.fixture(scope="module")
def samples(images) -> list[Sample]:
    return [Sample(q, (im,)) for q, im in zip(QUESTIONS, images, strict=True)]


def tokens(generations) -> list[list[int]]:
    return [g.token_ids for g in generations]


# ---------------------------------------------------------------- the reference's code, ported


def reference_atten_process_eval(attention_map, head_indices, beta, threshod):
    """atten_process_eval of GATECH-EIC/ACT @ a267af7 (models/llama_modelling_aug.py), line for
    line, for batch row 0 of attention_map [1, H, Q, Q] (the head list passed in)."""
    for head_num in head_indices:
        modified_head = attention_map[0][head_num]
        device = modified_head.device
        shape = modified_head.shape[0]
        indices = torch.nonzero(torch.where(torch.sum(modified_head, dim=0)
                                            / torch.arange(shape, 0, -1).to(device) > threshod,
                                            1, 0))  # fmt: skip
        indices = indices[1:]
        copied_attention_map = modified_head.detach().clone()
        available_weights = modified_head[:, indices].sum(dim=1) * (1 - beta)
        modified_head[:, indices] *= beta
        copied_attention_map[1:, indices] *= 0
        ratios = copied_attention_map / torch.sum(copied_attention_map, dim=1, keepdim=True)
        modified_head = modified_head + available_weights * ratios
        modified_head[0, 0] = 1
        attention_map[0][head_num] = modified_head
    return attention_map


def identity_values(B, H, D):
    """v = I: attention's output row is then the probability row itself (out = P @ I)."""
    return torch.eye(D).expand(B, H, D, D).contiguous()


def random_attention(B=1, H=4, K=14, sinks=(0, 5), strength=3.0, seed=0):
    """q [B, H, K, K], k [B, H, K, K]: a shared direction makes columns `sinks` attractive
    (and column 0 repulsive when it is not one of them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, K, K, generator=g)
    k = torch.randn(B, H, K, K, generator=g)
    u = torch.randn(K, generator=g)
    q = q + strength * u
    for j in sinks:
        k[:, :, j] += strength * u
    if 0 not in sinks:
        k[:, :, 0] -= strength * u
    return q, k


def run_hook(hook, q, k, layout, state, phase="prefill", layer=2, plan=None):
    """The hook's edits for one call, applied by the plain-torch kernel with v = I: [B, H, Q, D]
    calibrated probabilities over the call's K keys (columns K.. of D are 0)."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    ctx = ForwardContext(plan, state, layout, phase, 4)
    v = identity_values(B, H, D)[:, :, :K]
    call = AttentionCall(layer, q, k, v, 1.0 / D**0.5, ctx)
    edits = hook.edits(call)
    edits = AttentionEdits(**edits) if edits else AttentionEdits()
    out, _ = edited_attention(q, k, v, scale=call.scaling, key_start=layout.key_start, edits=edits)
    return out.transpose(1, 2), call


def hook_of(lvlm, **fields):
    [hook] = lvlm.plan([ACT(**fields)]).attention_hooks
    return hook


def layout_of(B, K, image=(), key_start=None):
    mask = torch.zeros(B, K, dtype=torch.bool)
    mask[:, list(image)] = True
    start = torch.zeros(B, dtype=torch.long) if key_start is None else key_start
    return ImageLayout(mask, start)


def state_of(B, edited=None):
    state = RowState.start((), B, "cpu")
    if edited is not None:
        state["row.edited"] = edited
    return state


def plain(q, k, layout):
    """The plain-torch kernel's unedited probabilities [B, H, K, K] (v = I)."""
    B, H, _, D = q.shape
    out, _ = edited_attention(q, k, identity_values(B, H, D), scale=1.0 / D**0.5,
                              key_start=layout.key_start, edits=AttentionEdits())  # fmt: skip
    return out.transpose(1, 2)


def stock(q, k):
    """Plain causal probabilities of q, k [B, H, K, D] without padding: [B, H, K, K]."""
    K = k.shape[2]
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = torch.ones(K, K, dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf")).softmax(-1)


@pytest.mark.parametrize("exclude", ["first_token", "first_detected"])
def test_prefill_equals_the_reference_code(lvlms, exclude):
    lvlm = lvlms["llava"]
    q, k = random_attention()
    K = k.shape[2]
    hook = hook_of(lvlm, exclude_first=exclude)  # tiny model: layer 2, every head
    ours, _ = run_hook(hook, q, k, layout_of(1, K), state_of(1))
    p = stock(q, k)
    expected = reference_atten_process_eval(p.clone(), range(4), 0.4, 0.1)
    sums = p[0].sum(1) / torch.arange(K, 0, -1)
    assert (sums > 0.1)[:, 0].all() and (sums > 0.1).sum() > 3  # BOS and other sinks
    assert not torch.allclose(ours, p, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)

    # without a BOS sink the code drops the first detected sink instead (first_detected)
    q, k = random_attention(sinks=(3, 6), seed=1)
    sums = stock(q, k)[0].sum(1) / torch.arange(K, 0, -1)
    assert not (sums > 0.1)[:, 0].any()
    ours, _ = run_hook(hook, q, k, layout_of(1, K), state_of(1))
    expected = reference_atten_process_eval(stock(q, k), range(4), 0.4, 0.1)
    same = torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert same == (exclude == "first_detected")


@pytest.mark.parametrize("mode", ["running", "current_row"])
def test_decode_rows_equal_the_reference_run_without_cache(lvlms, mode):
    """running: each decode row is what the reference computes for the last row of the whole
    sequence run at once; current_row: sinks from that row alone. Batch rows with padding."""
    lvlm = lvlms["llava"]
    q, k = random_attention(B=2, seed=2)
    K, prompt = k.shape[2], 8
    # row 1: two padding columns on the left (q, k of real columns shifted right)
    q[1, :, 2:], k[1, :, 2:] = q[0, :, :-2].clone(), k[0, :, :-2].clone()
    layout = layout_of(2, prompt, key_start=torch.tensor([0, 2]))
    state = state_of(2)
    hook = hook_of(lvlm, decode=mode)
    run_hook(hook, q[:, :, :prompt], k[:, :, :prompt], layout, state)
    assert ("act.colsum.2" in state) == (mode == "running")
    changed = False
    for t in range(prompt, K):
        row, _ = run_hook(hook, q[:, :, t : t + 1], k[:, :, : t + 1], layout, state, "decode")
        unedited = stock(q[:1, :, : t + 1], k[:1, :, : t + 1])[0, :, -1]
        changed |= not torch.allclose(row[0, :, 0, : t + 1], unedited, atol=1e-3)
        for r, pad in ((0, 0), (1, 2)):
            expected = uncached_last_row(q[:1, :, : t + 1 - pad], k[:1, :, : t + 1 - pad], mode)
            got = row[r, :, 0, pad : t + 1]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert row[1, :, 0, :2].eq(0).all()  # padding stays empty
    assert changed


def uncached_last_row(q, k, mode):
    """The last row of ACT's map of the whole sequence (running), or of that row alone."""
    whole = stock(q, k)
    if mode == "running":
        return reference_atten_process_eval(whole.clone(), range(4), 0.4, 0.1)[0, :, -1]
    last = whole[0, :, -1]  # [H, t + 1]
    sink = last > 0.1
    sink[:, 0] = False
    mass = (last * sink).sum(-1, keepdim=True)
    return torch.where(sink, 0.4 * last, last + 0.6 * mass * last / (last * ~sink).sum(-1, True))


# ---------------------------------------------------------------- the switches


def test_sink_scope_rows_and_targets(lvlms):
    lvlm = lvlms["llava"]
    q, k = random_attention(sinks=(0, 3, 9), seed=3)
    K = k.shape[2]
    image = range(2, 7)
    layout = layout_of(1, K, image)
    p = plain(q, k, layout)

    def sinks(**fields):
        _, call = run_hook(hook_of(lvlm, **fields), q, k, layout, state_of(1))
        hook = hook_of(lvlm, **fields)
        [mod] = hook.edits(call)["prob_mods"]
        return mod.sink[0]  # [H, K]

    every, text, pictured = sinks(), sinks(sink_scope="text"), sinks(sink_scope="image")
    assert pictured.any() and text.any() and not every[:, 0].any()
    assert torch.equal(every, text | pictured) and not (text & pictured).any()
    assert not pictured[:, [0, 1, *range(7, K)]].any()

    after, _ = run_hook(hook_of(lvlm, edited_rows="after_image"), q, k, layout, state_of(1))
    torch.testing.assert_close(after[:, :, :7], p[:, :, :7], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, 7:], p[:, :, 7:], atol=1e-3)

    kept, _ = run_hook(hook_of(lvlm, first_token_receives=False), q, k, layout, state_of(1))
    torch.testing.assert_close(kept[..., 0], p[..., 0], rtol=0, atol=0)
    torch.testing.assert_close(kept.sum(-1), torch.ones(1, 4, K), rtol=0, atol=1e-5)

    # alpha / N with alpha = 0.1 N is the absolute 0.1 (N = the last row's real columns)
    alpha = sinks(threshold_mode="alpha_over_n", alpha=0.1 * K)
    assert torch.equal(alpha, every)
    # min_rows: column 9 is seen by 5 rows only
    late = torch.arange(K) > K - 6
    assert every[:, 9].any() and torch.equal(sinks(min_rows=6), every & ~late)

    # rows that are not edited (a view's unedited row) are left alone
    none, _ = run_hook(hook_of(lvlm), q, k, layout, state_of(1, torch.tensor([False])))
    torch.testing.assert_close(none, p, rtol=0, atol=0)


def test_heads_and_layers():
    big = ModelInfo("llava", "llama", 32, 32, 32, 128, 4096, 32000, 32000, "x")
    auto = calibrated_heads("auto", calibrated_layers(2, True, 32), big)
    assert [layer for layer, _ in auto] == [x for x in range(2, 31) if x != 28]
    assert sum(len(h) for _, h in auto) == 184 == sum(map(len, LLAMA2_CHAT_CLS))
    assert auto[0] == (2, (2, 8, 12, 13, 16, 17, 20, 25)) and auto[-1] == (30, (2,))
    later = calibrated_heads("llama2_chat_cls", calibrated_layers(10, False, 32), big)
    assert [layer for layer, _ in later] == [x for x in range(10, 31) if x != 28]
    mistral = ModelInfo("llava_next", "mistral", 32, 32, 8, 128, 4096, 32000, 32000, "x")
    qwen = ModelInfo("llava_onevision", "qwen2", 28, 28, 4, 128, 3584, 152000, 151646, "x")
    for info in (mistral, qwen):
        heads = calibrated_heads("auto", calibrated_layers(2, True, info.num_layers), info)
        layers = range(2, info.num_layers - 1)
        assert heads == tuple((x, tuple(range(info.num_heads))) for x in layers)
        with pytest.raises(ValueError, match="searched on Llama-2-7B"):
            ACT(heads="llama2_chat_cls").contribute(info)
    assert calibrated_layers(2, True, 4) == range(2, 3)  # the tiny and gym models: layer 2
    assert calibrated_layers(2, False, 4) == range(2, 4)
    with pytest.raises(ValueError, match="empty"):
        calibrated_layers(3, True, 4)
    custom = calibrated_heads([(5, 3), (2, 1), (5, 0)], range(2, 31), big)
    assert custom == ((2, (1,)), (5, (0, 3)))
    with pytest.raises(ValueError, match="outside"):
        calibrated_heads([(31, 0)], range(2, 31), big)
    with pytest.raises(ValueError):
        ACT(heads=[(-1, 0)])
    assert ACT(heads=[[2, 0]]).heads == [(2, 0)]  # JSON pairs


# ---------------------------------------------------------------- on the models


def test_neutral_settings_change_nothing(lvlms, samples):
    lvlm = lvlms["llava"]
    neutral = [{"name": "act", "beta": 1.0}]
    for spec in neutral + [{"name": "act", "heads": []}, {"name": "act", "threshold": 1.0}]:
        assert lvlm.plan([spec]).attention_hooks == ()
    base = lvlm.generate(samples, params=PARAMS)
    assert tokens(lvlm.generate(samples, neutral, PARAMS)) == tokens(base)
    _, base_logits = prefill(lvlm, samples, [])
    _, neutral_logits = prefill(lvlm, samples, neutral)
    assert torch.equal(base_logits, neutral_logits)
    # no column passes a threshold of 0.999: the modifier runs and changes nothing
    _, idle = prefill(lvlm, samples, [{"name": "act", "threshold": 0.999}])
    torch.testing.assert_close(idle, base_logits, rtol=0, atol=1e-5)


def prefill(lvlm: LVLM, samples, specs):
    from lvlm_fix.decoding import Runner, build_rows

    plan = lvlm.plan(specs)
    batch = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    state = RowState.start(plan.views, len(samples), lvlm.device)
    runner = Runner(lvlm.model, batch, plan, state, lvlm.info.num_layers)
    return runner, runner.prefill()


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_batch_equals_alone(lvlms, samples, family):
    lvlm = lvlms[family]
    together = lvlm.generate(samples, [{"name": "act"}], PARAMS)
    alone = [lvlm.generate([s], [{"name": "act"}], PARAMS)[0] for s in samples]
    assert tokens(together) == tokens(alone)
    assert together[0].prompt_tokens != together[1].prompt_tokens  # left padding
    runner, logits = prefill(lvlm, samples, [{"name": "act"}])
    _, plain = prefill(lvlm, samples, [])
    assert not torch.allclose(logits, plain, atol=1e-4)  # ACT acts
    assert runner.state["act.colsum.2"].shape[:2] == (2, lvlm.info.num_heads)


def test_the_engine_reports_the_path_that_ran(lvlms, samples):
    lvlm = lvlms["llava"]
    params = GenerationParams(max_new_tokens=4)
    running = lvlm.generate(samples, [{"name": "act"}], params)
    assert running[0].attention_paths == ["modifiers", "sdpa"]  # layers 0, 1, 3 unedited
    prefill_only = lvlm.generate(samples, [{"name": "act", "decode": "prefill_only"}], params)
    # prefill: modifiers at layer 2; decode in the shared batch, with the fused kernel
    assert prefill_only[0].attention_paths == ["fused", "modifiers", "sdpa"]
    assert lvlm.plan([{"name": "act", "decode": "prefill_only"}]).shared_decode
    assert not lvlm.plan([{"name": "act"}]).shared_decode


# ---------------------------------------------------------------- an independent eager loop


@dataclass
class EagerACT:
    """ACT written from the spec as an eager attention for one unpadded row (batch 1): running
    column sums per layer of the plain probabilities, sinks = mean > threshold minus column 0,
    sinks x beta, the rest x (1 - beta M) / (1 - M)."""

    layers: tuple[int, ...] = (2,)
    beta: float = 0.4
    threshold: float = 0.1
    decode: str = "running"
    colsum: dict[int, torch.Tensor] = field(default_factory=dict)
    prefill: bool = True

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):  # fmt: skip
        q, k, v = query[0].float(), key[0].float(), value[0].float()
        group = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        Q, K = q.shape[1], k.shape[1]
        s = (scaling or q.shape[-1] ** -0.5) * q @ k.transpose(-1, -2)
        causal = torch.arange(K)[None] <= (K - Q + torch.arange(Q))[:, None]
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)  # [H, Q, K]
        if module.layer_idx in self.layers and (self.prefill or self.decode != "prefill_only"):
            if self.decode == "current_row" and not self.prefill:
                mean = p[:, -1]
            else:
                old = self.colsum.get(module.layer_idx, torch.zeros(p.shape[0], 0))
                total = torch.nn.functional.pad(old, (0, K - old.shape[1])) + p.sum(1)
                self.colsum[module.layer_idx] = total
                mean = total / torch.arange(K, 0, -1)  # rows j..K-1 see column j
            sink = mean > self.threshold
            sink[:, 0] = False
            m = (p * sink[:, None]).sum(-1, keepdim=True)
            p = p * torch.where(sink[:, None], self.beta, (1 - self.beta * m) / (1 - m))
        out = (p @ v).transpose(0, 1)[None]  # [1, Q, H, D]
        return out.to(query.dtype), None


def eager_generate(model, processor, eager: EagerACT, sample: Sample, n: int, eos: int):
    prompt = render_prompt(processor, sample.text, len(sample.images))
    inputs = processor(images=list(sample.images), text=prompt, return_tensors="pt")
    cache = DynamicCache(config=model.config.get_text_config())
    out, ids = None, []
    with torch.inference_mode():
        out = model(**inputs, **cache_kwargs(cache), use_cache=True)
        eager.prefill = False
        for _ in range(n):
            token = int(out.logits[0, -1].argmax())
            ids.append(token)
            if token == eos:
                break
            out = model(input_ids=torch.tensor([[token]]), **cache_kwargs(cache), use_cache=True)
    return ids


@pytest.mark.parametrize("decode", ["running", "prefill_only", "current_row"])
def test_an_eager_loop_written_from_the_spec_gives_the_engines_tokens(
    lvlms, tiny_paths, samples, decode
):
    lvlm = lvlms["llava"]
    model_class = FAMILIES["llava"].model_class
    model = model_class.from_pretrained(tiny_paths["llava"])
    peak(model, "llava")
    name = "test_act_eager"
    AttentionMaskInterface.register(name, sdpa_mask)
    processor = AutoProcessor.from_pretrained(tiny_paths["llava"])
    eos = processor.tokenizer.eos_token_id
    spec = [{"name": "act", "decode": decode}]
    engine = tokens(lvlm.generate(samples, spec, PARAMS))
    plain = tokens(lvlm.generate(samples, [], PARAMS))
    assert engine != plain  # ACT changes the tokens here
    for sample, expected in zip(samples, engine, strict=True):
        eager = EagerACT(decode=decode)
        AttentionInterface.register(name, eager)
        model.set_attn_implementation({"text_config": name})
        ours = eager_generate(model, processor, eager, sample, PARAMS.max_new_tokens, eos)
        assert ours[: len(expected)] == expected


# ---------------------------------------------------------------- composition


@dataclass
class LastRows:
    """AttentionHook: at prefill of layer 2, the stock probabilities of every row and the final
    probabilities of the last row (after every edit)."""

    seen: dict = field(default_factory=dict)

    def edits(self, call):
        return {"want_last_row": True} if call.layer == 2 else None

    def after(self, call, out, stats):
        if call.layer == 2 and call.ctx.phase == "prefill":
            self.seen.update(stock=call.probabilities(), last=stats["last_row"])


class Look(Intervention):
    name: ClassVar[str] = "test_act_look"
    hooks: ClassVar[frozenset] = frozenset({"attention"})

    def contribute(self, model) -> Contribution:
        return Contribution(attention=LastRows())


VAR_TINY = {"name": "var", "sink_dims": list(range(8)), "tau": 2.0, "max_sink_share": 1.0,
            "min_image_mass": 0.0}  # fmt: skip


def test_act_composes_after_var(lvlms, samples):
    """ACT's sinks come from the stock probabilities; its edit applies to VAR's output."""
    lvlm = lvlms["llava"]

    def look(specs):
        runner, _ = prefill(lvlm, samples, [Look(), *specs])
        return runner.plan.attention_hooks[0].seen

    var, both = look([VAR_TINY]), look([VAR_TINY, {"name": "act"}])
    stock = var["stock"]  # [R, H, S, S], layer 2's input is the plain model's
    torch.testing.assert_close(both["stock"], stock, rtol=0, atol=0)
    start = prefill(lvlm, samples, [])[0].layout.key_start
    S = stock.shape[-1]
    cols = torch.arange(S)
    count = (S - cols)[None].expand(2, S)
    sink = (stock.sum(2) / count[:, None]) > 0.1  # [R, H, S]
    sink &= (cols[None] > start[:, None])[:, None]  # nor the first real token; padding
    assert sink.any()
    p = var["last"]
    assert not torch.allclose(p, look([])["last"])  # VAR acts
    m = (p * sink).sum(-1, keepdim=True)
    expected = p * torch.where(sink, 0.4, (1 - 0.4 * m) / (1 - m))
    torch.testing.assert_close(both["last"], expected, rtol=1e-5, atol=1e-6)
    params = GenerationParams(max_new_tokens=6)
    together = lvlm.generate(samples, [VAR_TINY, {"name": "act"}], params)
    alone = [lvlm.generate([s], [VAR_TINY, {"name": "act"}], params)[0] for s in samples]
    assert tokens(together) == tokens(alone)


def test_composition_with_views_beams_and_refusals(lvlms, samples):
    lvlm = lvlms["llava"]
    params = GenerationParams(max_new_tokens=6)
    mix = [{"name": "act"}, {"name": "vhr"}, {"name": "pai_cfg"}, {"name": "ritual"}]
    together = lvlm.generate(samples, mix, params)
    alone = [lvlm.generate([s], mix, params)[0] for s in samples]
    assert tokens(together) == tokens(alone)
    beams = GenerationParams(max_new_tokens=5, num_beams=2)
    together = lvlm.generate(samples, [{"name": "act"}, {"name": "pai"}], beams)
    alone = [lvlm.generate([s], [{"name": "act"}, {"name": "pai"}], beams)[0] for s in samples]
    assert tokens(together) == tokens(alone)
    pruned = [{"name": "act"}, {"name": "fastv", "keep": 8}]
    together = lvlm.generate(samples, pruned, params)
    assert tokens(together) == [lvlm.generate([s], pruned, params)[0].token_ids for s in samples]
    for decode in ("running", "current_row"):
        with pytest.raises(PlanConflict, match="'act' and 'opera' cannot be combined"):
            lvlm.plan([{"name": "act", "decode": decode}, {"name": "opera"}])
    lvlm.plan([{"name": "act", "decode": "prefill_only"}, {"name": "opera"}])  # no state


def test_plans_pickle_and_compile_equal(lvlms):
    lvlm = lvlms["llava"]
    spec = {"name": "act", "heads": [[2, 1], [2, 3]], "threshold_mode": "alpha_over_n",
            "sink_scope": "image", "edited_rows": "after_image",
            "decode": "current_row"}  # fmt: skip
    plan = lvlm.plan([spec])
    assert pickle.loads(pickle.dumps(plan)) == plan == lvlm.plan([spec])
    assert lvlm.plan([{**spec, "alpha": 2.0}]) != plan
    assert lvlm.plan([{**spec, "heads": [[2, 1]]}]).attention_hooks != plan.attention_hooks
