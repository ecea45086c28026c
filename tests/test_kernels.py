"""The plain-torch edited attention (the kernels' oracle) against hand-built rows, a naive
per-row loop, and the VAR / PAI / VHR invariants (specs/var.md s4, specs/vhr.md s3)."""

import dataclasses
import math

import pytest
import torch

from lvlm_fix.kernels import AttentionEdits, edited_attention
from lvlm_fix.kernels import reference as ref
from lvlm_fix.kernels.edits import IMAGE, TEXT_SINK, VISUAL_SINK


def make_case(B=2, H=4, Hkv=2, Q=6, K=16, D=16, seed=0, key_start=(0, 3)):
    """Random q/k/v and a column layout: a text sink at key_start, image span with one or two
    visual sinks, ragged per row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g)
    k = torch.randn(B, Hkv, K, D, generator=g)
    v = torch.randn(B, Hkv, K, D, generator=g)
    key_start = torch.tensor(key_start[:B], dtype=torch.int64)
    col_group = torch.zeros(B, K, dtype=torch.int8)
    for b in range(B):
        s = int(key_start[b])
        lo, hi = s + 2, s + 2 + (K - s) // 2
        col_group[b, s] = TEXT_SINK
        col_group[b, lo:hi] = IMAGE
        col_group[b, lo + 1 + b] = VISUAL_SINK
    return q, k, v, key_start, col_group, g


def all_edits(col_group, B, H, Q, g, **over):
    fields = dict(
        col_group=col_group,
        image_gain=torch.rand(B, H, generator=g) * 0.5,
        gain_rows=torch.rand(B, Q, generator=g) > 0.4,
        var_rows=torch.rand(B, Q, generator=g) > 0.3,
        var_keep=0.6,
        head_scale=torch.rand(B, H, generator=g) + 0.5,
        want_group_mass=True,
        want_last_row=True,
    )
    fields.update(over)
    return AttentionEdits(**fields)


def naive(q, k, v, scale, key_start, e: AttentionEdits):
    """One (b, h, i) row at a time, straight from the spec's formulas."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    G = H // k.shape[1]
    out = torch.zeros(B, Q, H, D)
    mass = torch.zeros(B, H, Q, 4)
    last = torch.zeros(B, H, K)
    for b in range(B):
        groups = [int(x) for x in e.col_group[b]] if e.col_group is not None else [0] * K
        n_img = sum(1 for x in groups if x >= 2)
        for h in range(H):
            for i in range(Q):
                s = scale * (k[b, h // G].float() @ q[b, h, i].float())  # [K]
                vis = [int(key_start[b]) <= j <= K - Q + i for j in range(K)]
                if e.image_gain is not None and bool(e.gain_rows[b, i]):
                    a = float(e.image_gain[b, h])
                    s = torch.stack(
                        [
                            s[j] + a * s[j].abs() if vis[j] and groups[j] >= 2 else s[j]
                            for j in range(K)
                        ]
                    )
                s = torch.where(torch.tensor(vis), s, torch.tensor(-math.inf))
                p = torch.softmax(s, 0) if any(vis) else torch.zeros(K)
                m = [float(sum(p[j] for j in range(K) if groups[j] == grp)) for grp in range(4)]
                mass[b, h, i] = torch.tensor(m)
                a_t, a_sv, a_u = m[1], m[2], m[3]
                a_v = a_sv + a_u
                if (
                    e.var_on
                    and bool(e.var_rows[b, i])
                    and a_v >= e.var_summ
                    and a_sv / (a_v + n_img * 1e-6) <= e.var_rho
                    and a_u > 0
                ):
                    f_u = 1 + (1 - e.var_keep) * (a_sv + a_t) / a_u
                    w = [e.var_keep if x in (1, 2) else f_u if x == 3 else 1.0 for x in groups]
                    p = p * torch.tensor(w)
                o = p @ v[b, h // G].float()
                if e.head_scale is not None:
                    o = o * e.head_scale[b, h]
                out[b, i, h] = o
                if i == Q - 1:
                    last[b, h] = p
    return out, mass, last


def probs(q, k, key_start, edits, scale=0.3):
    """The post-edit probabilities [B, H, Q, K], read out through v = identity (D = K)."""
    B, Hkv, K, _ = k.shape
    eye = torch.eye(K).expand(B, Hkv, K, K)
    out, stats = ref.edited_attention(q, k, eye, scale=scale, key_start=key_start, edits=edits)
    return out.transpose(1, 2), stats


def test_golden_vector():
    """var.md invariant 13: Lk=8, image=[2,6), sinks {0 text, 3 visual}, keep 0.6."""
    a = torch.tensor([0.30, 0.05, 0.10, 0.20, 0.10, 0.05, 0.15, 0.05])
    q = torch.zeros(1, 1, 1, 8)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 8, 8)
    k[0, 0, :, 0] = a.log()  # scores = log(a): softmax gives a back
    v = torch.eye(8).expand(1, 1, 8, 8)
    col_group = torch.tensor([[1, 0, 3, 2, 3, 3, 0, 0]], dtype=torch.int8)
    edits = AttentionEdits(
        col_group=col_group, var_rows=torch.ones(1, 1, dtype=torch.bool), var_keep=0.6,
        want_group_mass=True, want_last_row=True,
    )  # fmt: skip
    out, stats = ref.edited_attention(
        q, k, v, scale=1.0, key_start=torch.zeros(1, dtype=torch.long), edits=edits
    )
    # A_V = 0.45, A_Sv = 0.20 (ratio 0.44 <= 0.5), A_T = 0.30, A_U = 0.25: budget 0.4 * 0.5 = 0.2,
    # f_U = 1 + 0.2 / 0.25 = 1.8.
    expected = torch.tensor([0.18, 0.05, 0.18, 0.12, 0.18, 0.09, 0.15, 0.05])
    torch.testing.assert_close(out[0, 0, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["last_row"][0, 0], expected, atol=1e-6, rtol=0)
    mass = torch.tensor([0.25, 0.30, 0.20, 0.25])
    torch.testing.assert_close(stats["group_mass"][0, 0, 0], mass, atol=1e-6, rtol=0)


@pytest.mark.parametrize("Hkv", [4, 2, 1], ids=lambda n: f"Hkv{n}")
@pytest.mark.parametrize("Q", [1, 6], ids=lambda n: f"Q{n}")
def test_reference_matches_naive_loop(Q, Hkv):
    q, k, v, key_start, col_group, g = make_case(Q=Q, Hkv=Hkv, seed=Q + Hkv)
    edits = all_edits(col_group, 2, 4, Q, g, var_summ=0.1)
    out, stats = ref.edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=edits)
    n_out, n_mass, n_last = naive(q, k, v, 0.3, key_start, edits)
    torch.testing.assert_close(out, n_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["group_mass"], n_mass, atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["last_row"], n_last, atol=1e-6, rtol=0)


def test_no_edits_is_plain_attention():
    q, k, v, key_start, _, _ = make_case(Q=6, K=16)
    out, stats = ref.edited_attention(
        q, k, v, scale=0.25, key_start=key_start, edits=AttentionEdits()
    )
    mask = ref.visibility(key_start, 6, 16)
    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), atol=1e-6, rtol=1e-5)
    assert stats == {}


def var_case(seed=0, **over):
    """Probabilities before and after VAR (PAI off), and the edits used."""
    q, k, _, key_start, col_group, g = make_case(B=2, H=4, Hkv=4, Q=8, K=16, seed=seed)
    q = q * 2.0  # peakier rows: some selected, some not
    fields = dict(col_group=col_group, var_rows=torch.ones(2, 8, dtype=torch.bool), var_keep=0.6)
    edits = AttentionEdits(**{**fields, **over})
    before, _ = probs(q, k, key_start, AttentionEdits(col_group=col_group))
    after, _ = probs(q, k, key_start, edits)
    mass = ref.group_masses(before, col_group)
    f_sink, f_image = ref.var_weights(mass, edits)
    return before, after, mass, f_sink != 1, col_group, edits


def test_var_invariants():
    """var.md invariants 1, 3, 4, 5, 6 on every row of a random batch."""
    before, after, mass, sel, col_group, edits = var_case()
    assert 0 < sel.sum() < sel.numel(), "the case must have selected and unselected rows"
    group = col_group[:, None, None, :].expand_as(before)
    sink = (group == TEXT_SINK) | (group == VISUAL_SINK)
    image = group == IMAGE
    rest = group == 0
    s = sel[..., None].expand_as(before)
    # 1: row sums preserved.
    torch.testing.assert_close(after.sum(-1), before.sum(-1), atol=1e-6, rtol=0)
    # 3: sinks keep p_code of their mass in selected rows.
    torch.testing.assert_close(after[s & sink], 0.6 * before[s & sink], atol=1e-7, rtol=1e-6)
    # 4: non-sink image columns share one factor f_U >= 1 per row.
    ratio = torch.where(image & (before > 0), after / before, torch.nan)
    f_u = ratio.nanmean(-1)
    assert (f_u[sel] >= 1).all()
    spread = torch.where(image & s, (ratio - f_u[..., None]).abs(), 0.0).nan_to_num()
    assert spread.max() < 1e-5
    # 5: mass accounting.
    m_after = ref.group_masses(after, col_group)
    a_t, a_sv, a_u = mass[..., 1], mass[..., 2], mass[..., 3]
    torch.testing.assert_close(
        m_after[..., 3][sel], (a_u + 0.4 * (a_sv + a_t))[sel], atol=1e-6, rtol=0
    )
    image_after = m_after[..., 2] + m_after[..., 3]
    torch.testing.assert_close(image_after[sel], (a_sv + a_u + 0.4 * a_t)[sel], atol=1e-6, rtol=0)
    # 6: rest columns and unselected rows are bit-identical.
    assert torch.equal(after[rest], before[rest])
    assert torch.equal(after[~sel], before[~sel])


@pytest.mark.parametrize(
    "over",
    [dict(var_keep=1.0), dict(var_summ=1.01), dict(var_rows=torch.zeros(2, 8, dtype=torch.bool))],
    ids=["keep1", "summ_above_1", "no_rows"],
)
def test_var_identity_settings(over):
    """var.md invariant 2: settings that select nothing or keep everything change nothing."""
    before, after, _, _, _, _ = var_case(**over)
    assert torch.equal(after, before)


def test_var_logit_bias_equivalence():
    """var.md invariant 12: softmax(s + log w) == w * softmax(s) row-wise."""
    q, k, _, key_start, col_group, _ = make_case(B=2, H=4, Hkv=4, Q=8, K=16, seed=3)
    edits = AttentionEdits(
        col_group=col_group, var_rows=torch.ones(2, 8, dtype=torch.bool), var_keep=0.6
    )
    visible = ref.visibility(key_start, 8, 16)
    s = 0.6 * (q @ k.transpose(-1, -2))
    p = ref.masked_softmax(s, visible)
    mass = ref.group_masses(p, col_group)
    f_sink, f_image = ref.var_weights(mass, edits)
    group = col_group[:, None, None, :]
    w = torch.where(
        (group == 1) | (group == 2),
        f_sink[..., None],
        torch.where(group == 3, f_image[..., None], 1.0),
    )
    torch.testing.assert_close(
        ref.masked_softmax(s + w.log(), visible),
        ref.apply_var(p, mass, edits),
        atol=1e-6,
        rtol=1e-5,
    )


def test_pai_raises_image_mass_only_on_gain_rows():
    """vhr.md PAI invariants 2-4: image mass grows on gain rows; other rows are unchanged."""
    q, k, _, key_start, col_group, g = make_case(B=2, H=4, Hkv=4, Q=8, K=16, seed=5)
    gain_rows = torch.zeros(2, 8, dtype=torch.bool)
    gain_rows[:, -1] = True  # PAI's default: the last row
    gain_rows[0, 3] = True
    edits = AttentionEdits(
        col_group=col_group, image_gain=torch.full((2, 4), 0.3), gain_rows=gain_rows
    )
    before, _ = probs(q, k, key_start, AttentionEdits())
    after, _ = probs(q, k, key_start, edits)
    image = (col_group >= 2)[:, None, None, :]
    m_before = (before * image).sum(-1)
    m_after = (after * image).sum(-1)
    rows = gain_rows[:, None, :].expand_as(m_before)
    assert (m_after[rows] > m_before[rows]).all()
    assert torch.equal(after[~rows], before[~rows])
    zero, _ = probs(
        q,
        k,
        key_start,
        AttentionEdits(col_group=col_group, image_gain=torch.zeros(2, 4), gain_rows=gain_rows),
    )
    assert torch.equal(zero, before)


def test_head_scale_is_an_exact_epilogue():
    q, k, v, key_start, col_group, g = make_case(seed=7)
    base = all_edits(col_group, 2, 4, 6, g, head_scale=None)
    scale_bh = torch.rand(2, 4, generator=g) * 3
    plain, _ = ref.edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=base)
    scaled, _ = ref.edited_attention(
        q, k, v, scale=0.3, key_start=key_start,
        edits=AttentionEdits(**{**base.__dict__, "head_scale": scale_bh}),
    )  # fmt: skip
    assert torch.equal(scaled, plain * scale_bh[:, None, :, None])


def test_batch_rows_are_independent():
    """A ragged batch equals each row run alone (nothing leaks across rows)."""
    q, k, v, key_start, col_group, g = make_case(B=2, Q=6, K=16, seed=11, key_start=(4, 0))
    edits = all_edits(col_group, 2, 4, 6, g)
    out, stats = ref.edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=edits)
    for b in range(2):
        row = AttentionEdits(
            **{
                f: (t[b : b + 1] if isinstance(t, torch.Tensor) else t)
                for f, t in edits.__dict__.items()
            }
        )
        o, st = ref.edited_attention(
            q[b : b + 1],
            k[b : b + 1],
            v[b : b + 1],
            scale=0.3,
            key_start=key_start[b : b + 1],
            edits=row,
        )
        torch.testing.assert_close(o, out[b : b + 1], atol=1e-6, rtol=1e-6)
        for name in ("group_mass", "last_row"):
            torch.testing.assert_close(st[name], stats[name][b : b + 1], atol=1e-7, rtol=1e-6)


def per_row_var_case(col_group, Q, g):
    """Edits of a 3-row batch whose rows carry their own VAR (keep, rho, summ) as tensors, and
    each row's edits alone with floats. Row 2 has no VAR: var_rows False in the batch (its
    parameters would edit every row), no VAR fields alone."""
    keep = torch.tensor([0.6, 0.3, 0.2])
    rho = torch.tensor([0.5, 0.8, 1.0])
    summ = torch.tensor([0.1, 0.05, 0.0])
    var_rows = torch.rand(3, Q, generator=g) > 0.2
    var_rows[2] = False
    stats = dict(want_group_mass=True, want_last_row=True)
    batch = AttentionEdits(col_group=col_group, var_rows=var_rows, var_keep=keep, var_rho=rho,
                           var_summ=summ, **stats)  # fmt: skip
    alone = [
        AttentionEdits(
            col_group=col_group[b : b + 1],
            var_rows=var_rows[b : b + 1],
            var_keep=float(keep[b]),
            var_rho=float(rho[b]),
            var_summ=float(summ[b]),
            **stats,
        )
        for b in range(2)
    ]
    return batch, [*alone, AttentionEdits(col_group=col_group[2:], **stats)]


def test_per_row_var_params_equal_each_row_alone():
    """Rows of different VAR settings (and one without VAR) in one call: each row's output and
    statistics are those of the row run alone with its own floats."""
    q, k, v, key_start, col_group, g = make_case(B=3, Q=6, seed=31, key_start=(0, 3, 1))
    q = q * 2.0  # peakier rows: some selected
    batch, alone = per_row_var_case(col_group, 6, g)
    out, stats = ref.edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=batch)
    f_sink, _ = ref.var_weights(stats["group_mass"], batch)
    for b in range(3):
        o, st = ref.edited_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], scale=0.3,
                                     key_start=key_start[b : b + 1], edits=alone[b])  # fmt: skip
        torch.testing.assert_close(o, out[b : b + 1], atol=1e-6, rtol=1e-6)
        for name in ("group_mass", "last_row"):
            torch.testing.assert_close(st[name], stats[name][b : b + 1], atol=1e-7, rtol=1e-6)
        edited = f_sink[b] != 1  # the case must edit the VAR rows, each with its own keep
        assert edited.any() == (b < 2)
        assert (f_sink[b][edited] == batch.var_keep[b]).all()


@pytest.mark.parametrize("fields", ["var_keep", "all"])
def test_var_params_as_tensors_equal_floats(fields):
    """Per-row tensors holding the float values give bit-identical results (also when only
    var_keep is a tensor: the floats fill the other columns)."""
    q, k, v, key_start, col_group, g = make_case(seed=37)
    floats = all_edits(col_group, 2, 4, 6, g, var_rho=0.7, var_summ=0.1)
    names = ("var_keep",) if fields == "var_keep" else ("var_keep", "var_rho", "var_summ")
    rows = {n: torch.full((2,), getattr(floats, n), dtype=torch.float32) for n in names}
    tensors = dataclasses.replace(floats, **rows)
    kw = dict(scale=0.3, key_start=key_start)
    want, want_stats = edited_attention(q, k, v, edits=floats, **kw)
    got, got_stats = edited_attention(q, k, v, edits=tensors, **kw)
    assert torch.equal(got, want)
    for name, value in want_stats.items():
        assert torch.equal(got_stats[name], value)


def test_fully_padded_rows_are_zero_not_nan():
    q, k, v, _, col_group, g = make_case(B=2, Q=6, K=8)
    key_start = torch.tensor([0, 5])  # row b=1, i=0..2 see key columns <= 2..4: nothing
    out, stats = ref.edited_attention(
        q, k, v, scale=0.3, key_start=key_start, edits=all_edits(col_group, 2, 4, 6, g)
    )
    assert not out.isnan().any() and not stats["group_mass"].isnan().any()
    assert (out[1, :3] == 0).all() and (out[1, 3:] != 0).any()


def test_public_op_matches_reference_on_cpu():
    q, k, v, key_start, col_group, g = make_case(seed=13)
    edits = all_edits(col_group, 2, 4, 6, g)
    want, want_stats = ref.edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=edits)
    got, got_stats = edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=edits)
    assert torch.equal(got, want)
    assert got_stats.keys() == want_stats.keys()
    for name in want_stats:
        assert torch.equal(got_stats[name], want_stats[name])


def test_custom_op_fake_and_schema():
    from lvlm_fix.kernels import _edited_attention_op

    q, k, v, key_start, col_group, g = make_case(seed=17)
    e = all_edits(col_group, 2, 4, 6, g)
    end = torch.tensor([14])  # a static cache filled up to column 14 of 16
    var = torch.tensor([[0.6, 0.3], [0.5, 0.8], [0.2, 0.1]])  # per row: keep, rho, summ
    for var_params in (tuple(var), (None,) * 3):
        args = (q, k, v, key_start, end, 0.3, e.col_group, e.image_gain, e.gain_rows, e.var_rows,
                *var_params, e.n_image, e.head_scale, True, False)  # fmt: skip
        torch.library.opcheck(_edited_attention_op, args)


def test_public_op_traces_in_one_graph():
    """torch.compile(fullgraph=True) sees one custom op (fake impl for shapes), no graph break."""
    q, k, v, key_start, col_group, g = make_case(seed=19)
    edits = all_edits(col_group, 2, 4, 6, g)

    def step(q, k, v):
        return edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=edits)

    out, stats = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v)
    want, want_stats = ref.edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=edits)
    assert torch.equal(out, want) and torch.equal(stats["last_row"], want_stats["last_row"])


def test_public_op_traces_per_row_var_params():
    """Per-row VAR tensors are graph inputs: new values reuse the graph and take effect."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, key_start, col_group, g = make_case(B=3, seed=41, key_start=(0, 3, 1))
    batch, _ = per_row_var_case(col_group, 6, g)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(edited_attention, backend=backend, fullgraph=True)
    for keep in (batch.var_keep, batch.var_keep.flip(0)):
        edits = dataclasses.replace(batch, var_keep=keep)
        kw = dict(scale=0.3, key_start=key_start, edits=edits)
        out, stats = compiled(q, k, v, **kw)
        want, want_stats = ref.edited_attention(q, k, v, **kw)
        assert torch.equal(out, want) and torch.equal(stats["last_row"], want_stats["last_row"])
    assert backend.frame_count == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(col_group=torch.zeros(2, 16, dtype=torch.int64)), "col_group"),
        (dict(image_gain=torch.zeros(2, 4)), "gain_rows"),
        (dict(var_rows=torch.ones(2, 6, dtype=torch.bool)), "col_group"),
        (dict(head_scale=torch.ones(2, 3)), "head_scale"),
        (dict(col_group=torch.zeros(2, 16, dtype=torch.int8), var_keep=1.5), "var_keep"),
        (dict(var_rho=torch.ones(3)), "var_rho"),
        (dict(var_summ=torch.ones(2, dtype=torch.float64)), "var_summ"),
        (dict(want_group_mass=True), "col_group"),
        (dict(col_group=torch.zeros(2, 17, dtype=torch.int8)), "G <= K"),
    ],
    ids=[
        "col_group_dtype",
        "gain_without_rows",
        "var_without_groups",
        "head_scale_shape",
        "keep_range",
        "per_row_rho_shape",
        "per_row_summ_dtype",
        "mass_without_groups",
        "col_group_wider_than_keys",
    ],
)
def test_bad_edits_raise_clear_errors(bad, message):
    q, k, v, key_start, _, _ = make_case()
    with pytest.raises(ValueError, match=message):
        edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=AttentionEdits(**bad))


def test_bad_inputs_raise_clear_errors():
    q, k, v, key_start, _, _ = make_case()
    with pytest.raises(ValueError, match="multiple"):
        edited_attention(q[:, :3], k, v, scale=0.3, key_start=key_start, edits=AttentionEdits())
    with pytest.raises(TypeError, match="dtype"):
        edited_attention(q.half(), k, v, scale=0.3, key_start=key_start, edits=AttentionEdits())
    with pytest.raises(ValueError, match="key_start"):
        edited_attention(q, k, v, scale=0.3, key_start=key_start.float(), edits=AttentionEdits())
    with pytest.raises(ValueError, match="Q=20"):
        edited_attention(
            torch.randn(2, 4, 20, 16), k, v, scale=0.3, key_start=key_start, edits=AttentionEdits()
        )


def test_narrow_col_group_means_rest_past_its_width():
    """col_group [B, G < K] equals the same map padded with group 0 over columns G..K."""
    q, k, v, key_start, col_group, g = make_case(seed=23)
    col_group[:, 11:] = 0  # the padded twin has no groups past the narrow one's width
    full = all_edits(col_group, 2, 4, 6, g)
    narrow = dataclasses.replace(full, col_group=col_group[:, :11].contiguous())
    kw = dict(scale=0.3, key_start=key_start)
    want, want_stats = edited_attention(q, k, v, edits=full, **kw)
    got, got_stats = edited_attention(q, k, v, edits=narrow, **kw)
    unchecked, _ = edited_attention(q, k, v, edits=narrow, validate=False, **kw)
    assert torch.equal(got, want) and torch.equal(unchecked, want)
    for name, value in want_stats.items():
        assert torch.equal(got_stats[name], value)


@pytest.mark.parametrize("Q", [1, 3])
def test_key_end_ignores_a_static_cache_tail(Q):
    """Keys [.., K, ..] with key_end E equal the first E keys alone: the empty tail of a static
    cache (huge values here) gets no weight, and the last row's probabilities there are 0."""
    q, k, v, key_start, col_group, g = make_case(Q=Q, K=16, seed=29)
    E = 11
    edits = all_edits(col_group[:, :E].contiguous(), 2, 4, Q, g)
    kw = dict(scale=0.3, key_start=key_start, edits=edits)
    want, want_stats = edited_attention(q, k[:, :, :E], v[:, :, :E], **kw)
    k[:, :, E:], v[:, :, E:] = 1e4, -1e4
    end = torch.tensor([E])
    got, got_stats = edited_attention(q, k, v, key_end=end, **kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_stats["group_mass"], want_stats["group_mass"])
    last = got_stats["last_row"]
    torch.testing.assert_close(last[..., :E], want_stats["last_row"])
    assert torch.equal(last[..., E:], torch.zeros_like(last[..., E:]))
    with pytest.raises(ValueError, match="key_end"):
        edited_attention(q, k, v, key_end=torch.tensor(E), **kw)


def test_key_end_per_row():
    """key_end [B]: each row equals the same row with its first key_end[b] keys alone."""
    q, k, v, key_start, col_group, g = make_case(Q=1, K=16, seed=31)
    ends = (11, 16)
    edits = all_edits(col_group, 2, 4, 1, g)
    got, _ = edited_attention(q, k, v, scale=0.3, key_start=key_start, edits=edits,
                              key_end=torch.tensor(ends))  # fmt: skip
    for b, end in enumerate(ends):
        row = dataclasses.replace(edits, **{
            name: getattr(edits, name)[b : b + 1] for name in ("image_gain", "gain_rows",
            "var_rows", "head_scale", "n_image") if getattr(edits, name) is not None
        }, col_group=edits.col_group[b : b + 1, :end].contiguous())  # fmt: skip
        one = slice(b, b + 1)
        want, _ = edited_attention(q[one], k[one, :, :end], v[one, :, :end], scale=0.3,
                                   key_start=key_start[one], edits=row)  # fmt: skip
        torch.testing.assert_close(got[b : b + 1], want)
