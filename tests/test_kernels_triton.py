"""Triton kernels against the plain-torch reference, on CPU under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when it defines its own and our kernels, so the flag must be set
before `triton` is first imported. When this module is the first to import it, the tests run
here (the flag is set, then dropped again for the rest of the session, and set while each test
runs). When something imported triton earlier (transformers does), they are skipped here and
`test_interpreted_in_subprocess` runs this file in a fresh interpreter instead.
Tiny shapes, fp32 and fp16 only: bf16 is not supported by the interpreter.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

# Preloaded without the flag (conftest sets it first on machines without a GPU); the
# subprocess never starts another one.
TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
SUBPROCESS = os.environ.get("LVLM_FIX_TRITON_SUBPROCESS") == "1"
in_process = pytest.mark.skipif(TRITON_PRELOADED, reason="triton imported before the flag")

if not TRITON_PRELOADED:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")  # a missing triton skips everything
    from lvlm_fix.kernels import triton_attention as ta
    from lvlm_fix.kernels import triton_sinks, triton_vhr

    if _previous is None:  # leave the rest of the test session as it was
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous

from test_kernels import per_row_var_case  # noqa: E402

from lvlm_fix.kernels import AttentionEdits  # noqa: E402
from lvlm_fix.kernels import reference as ref  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Triton also reads the flag while launching, so keep it on during these tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(not TRITON_PRELOADED or SUBPROCESS, reason="the tests ran in this process")
def test_interpreted_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "LVLM_FIX_TRITON_SUBPROCESS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "1 skipped" in summary, summary  # only this test skips


KERNELS = ("prefill", "decode")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOL = {  # (out atol, out rtol, stats atol)
    torch.float32: (2e-5, 1e-4, 1e-5),
    torch.float16: (4e-3, 1e-2, 2e-3),
}


def make_case(B, H, Hkv, Q, K, D, key_start, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(B, n, L, D, generator=g).to(dtype) for n, L in ((H, Q), (Hkv, K), (Hkv, K))
    )
    key_start = torch.tensor(key_start, dtype=torch.int32)
    col_group = torch.zeros(B, K, dtype=torch.int8)
    for b in range(B):  # a text sink at the first key, an image span with a visual sink
        s = int(key_start[b])
        lo, hi = min(s + 2, K - 1), min(s + 2 + (K - s) // 2, K)
        col_group[b, s] = 1
        col_group[b, lo:hi] = 3
        col_group[b, min(lo + b, K - 1)] = 2
    return q, k, v, key_start, col_group, g


def edits_for(kind, col_group, B, H, Q, g):
    pai = dict(
        image_gain=torch.rand(B, H, generator=g) * 0.5,
        gain_rows=torch.rand(B, Q, generator=g) > 0.3,
    )
    var = dict(var_rows=torch.rand(B, Q, generator=g) > 0.2, var_keep=0.6, var_summ=0.1)
    scale = dict(head_scale=torch.rand(B, H, generator=g) + 0.5)
    stats = dict(want_group_mass=True, want_last_row=True)
    fields = {
        "none": {},
        "all": {**pai, **var, **scale, **stats, "n_image": (col_group >= 2).sum(-1).float()},
        "pai": pai,
        "var": var,
        "head_scale": scale,
        "mass": dict(want_group_mass=True),
        "last_row": dict(want_last_row=True),
    }[kind]
    needs_groups = kind not in ("none", "head_scale", "last_row")
    return AttentionEdits(col_group=col_group if needs_groups else None, **fields)


def check(kernel, dtype, B=2, H=2, Hkv=1, Q=5, K=33, D=16, key_start=(0, 2), kind="all", seed=0,
          width=None):  # fmt: skip
    """width: cut col_group to its first `width` columns (the rest are group 0)."""
    q, k, v, ks, col_group, g = make_case(B, H, Hkv, Q, K, D, key_start, dtype, seed)
    if width is not None:
        col_group = col_group[:, :width].contiguous()
    edits = edits_for(kind, col_group, B, H, Q, g)
    want, want_stats = ref.edited_attention(q, k, v, scale=D**-0.5, key_start=ks, edits=edits)
    fn = ta.prefill_attention if kernel == "prefill" else ta.decode_attention
    got, got_stats = fn(q, k, v, scale=D**-0.5, key_start=ks, edits=edits)
    atol, rtol, stat_atol = TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    assert got_stats.keys() == want_stats.keys()
    for name, value in want_stats.items():
        torch.testing.assert_close(got_stats[name], value, atol=stat_atol, rtol=1e-3)
    return want_stats, edits


@in_process
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("K", [7, 33], ids=lambda n: f"K{n}")
@pytest.mark.parametrize("Q", [1, 5], ids=lambda n: f"Q{n}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_all_edits_gqa_ragged(dtype, Q, K, kernel):
    """PAI + VAR + head scale + both statistics, GQA 2:1, left padding of 2 on row 1."""
    stats, edits = check(kernel, dtype, Q=Q, K=K, seed=Q * K)
    f_sink, _ = ref.var_weights(stats["group_mass"], edits)
    if Q == 5:  # the case must exercise VAR's selected rows
        assert (f_sink != 1).any()


@in_process
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_no_edits(dtype, kernel):
    check(kernel, dtype, Hkv=2, key_start=(0, 0), kind="none")


@in_process
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["pai", "var", "head_scale", "mass", "last_row"])
def test_single_edit(kind, kernel):
    check(kernel, torch.float32, kind=kind, key_start=(3, 0), seed=1)


@in_process
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_prefill_many_row_blocks(dtype):
    """Q=40 spans three 16-row blocks: unmasked and masked key tiles, odd K, GQA 4:1."""
    check("prefill", dtype, H=4, Hkv=1, Q=40, K=45, key_start=(0, 7), seed=2)


@in_process
@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_padded_rows_are_zero(kernel):
    """Rows that see no key (key_start past their causal limit) output zeros, not NaN."""
    check(kernel, torch.float32, Q=5, K=7, key_start=(0, 5), seed=3)


@in_process
def test_decode_long_odd_k():
    """K=63 with D=32: several splits of several tiles, the last one partial."""
    check("decode", torch.float16, H=4, Hkv=2, Q=1, K=63, D=32, key_start=(0, 9), seed=4)


@in_process
def test_dispatch_and_head_dim_check():
    q, k, v, ks, col_group, g = make_case(2, 2, 2, 5, 33, 16, (0, 2), torch.float32)
    edits = edits_for("all", col_group, 2, 2, 5, g)
    want, _ = ref.edited_attention(q, k, v, scale=0.25, key_start=ks, edits=edits)
    got, _ = ta.edited_attention_triton(q, k, v, scale=0.25, key_start=ks, edits=edits)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    bad = torch.zeros(2, 2, 5, 24)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        ta.prefill_attention(bad, bad, bad, scale=0.2, key_start=ks, edits=AttentionEdits())


@in_process
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["all", "var"])
def test_col_group_narrower_than_keys(kind, kernel):
    """col_group covers the prompt (20 columns) and K=37 keys: later columns are group 0; "var"
    leaves n_image out, so the kernels count image columns within the narrow map."""
    stats, edits = check(kernel, torch.float32, Q=1 if kernel == "decode" else 5, K=37,
                         kind=kind, seed=5, width=20)  # fmt: skip
    assert edits.col_group.shape[1] == 20


@in_process
@pytest.mark.parametrize("kind", ["all", "none"])
def test_decode_key_end(kind):
    """A static cache: K=40 key slots of which the first 29 are filled. The split-K kernel with
    key_end equals the reference on the filled keys alone (the tail holds NaN)."""
    B, H, Hkv, K, E, D = 2, 4, 2, 40, 29, 16
    q, k, v, ks, col_group, g = make_case(B, H, Hkv, 1, K, D, (0, 3), torch.float16, seed=6)
    edits = edits_for(kind, col_group[:, :E].contiguous(), B, H, 1, g)
    kw = dict(scale=D**-0.5, key_start=ks, edits=edits)
    want, want_stats = ref.edited_attention(q, k[:, :, :E], v[:, :, :E], **kw)
    k[:, :, E:], v[:, :, E:] = float("nan"), float("nan")
    got, got_stats = ta.edited_attention_triton(q, k, v, key_end=torch.tensor([E]), **kw)
    atol, rtol, stat_atol = TOL[torch.float16]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    for name, value in want_stats.items():
        got_value = got_stats[name][..., :E] if name == "last_row" else got_stats[name]
        torch.testing.assert_close(got_value, value, atol=stat_atol, rtol=1e-3)
    if kind == "all":
        assert torch.equal(got_stats["last_row"][..., E:], torch.zeros(B, H, K - E))


@in_process
@pytest.mark.parametrize("kind", ["all", "none"])
def test_decode_key_end_per_row(kind):
    """The engine's slots: each row's keys fill its own first key_end[b] columns of K=40 (the
    rest hold NaN). Each row equals the reference on its own filled keys alone."""
    B, H, Hkv, K, D = 3, 4, 2, 40, 16
    ends = (29, 7, 40)
    q, k, v, ks, col_group, g = make_case(B, H, Hkv, 1, K, D, (0, 0, 0), torch.float16, seed=8)
    edits = edits_for(kind, col_group, B, H, 1, g)
    for b, end in enumerate(ends):
        k[b, :, end:], v[b, :, end:] = float("nan"), float("nan")
    got, got_stats = ta.edited_attention_triton(
        q, k, v, scale=D**-0.5, key_start=ks, edits=edits, key_end=torch.tensor(ends)
    )
    atol, rtol, stat_atol = TOL[torch.float16]
    for b, end in enumerate(ends):
        row = edits_for(kind, col_group[b : b + 1, :end].contiguous(), 1, H, 1, g)
        if kind == "all":  # the same per-row values as the batch's row b
            row = dataclasses.replace(row, **{
                name: getattr(edits, name)[b : b + 1] for name in ("image_gain", "gain_rows",
                "var_rows", "head_scale", "n_image") if getattr(edits, name) is not None
            })  # fmt: skip
        want, want_stats = ref.edited_attention(
            q[b : b + 1], k[b : b + 1, :, :end], v[b : b + 1, :, :end], scale=D**-0.5,
            key_start=ks[b : b + 1], edits=row,
        )  # fmt: skip
        torch.testing.assert_close(got[b : b + 1].float(), want.float(), atol=atol, rtol=rtol)
        if kind == "all":
            last = got_stats["last_row"][b : b + 1]
            torch.testing.assert_close(last[..., :end], want_stats["last_row"], atol=stat_atol,
                                       rtol=1e-3)  # fmt: skip
            assert torch.equal(last[..., end:], torch.zeros(1, H, K - end))


@in_process
@pytest.mark.parametrize("kernel", KERNELS)
def test_per_row_var_params(kernel):
    """Rows of different VAR settings (and one without VAR) in one call: each row's output and
    statistics are those of the row run alone with its own floats, and the reference's."""
    q, k, v, ks, col_group, g = make_case(3, 2, 1, 5, 33, 16, (0, 2, 1), torch.float32, seed=7)
    batch, alone = per_row_var_case(col_group, 5, g)
    fn = ta.prefill_attention if kernel == "prefill" else ta.decode_attention
    out, stats = fn(q, k, v, scale=0.25, key_start=ks, edits=batch)
    want, want_stats = ref.edited_attention(q, k, v, scale=0.25, key_start=ks, edits=batch)
    atol, rtol, stat_atol = TOL[torch.float32]
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    for name, value in want_stats.items():
        torch.testing.assert_close(stats[name], value, atol=stat_atol, rtol=1e-3)
    f_sink, _ = ref.var_weights(want_stats["group_mass"], batch)
    for b in range(3):
        assert (f_sink[b] != 1).any() == (b < 2)  # the VAR rows are edited, row 2 is not
        o, st = fn(q[b : b + 1], k[b : b + 1], v[b : b + 1], scale=0.25,
                   key_start=ks[b : b + 1], edits=alone[b])  # fmt: skip
        torch.testing.assert_close(o, out[b : b + 1], atol=atol, rtol=rtol)
        for name, value in st.items():
            torch.testing.assert_close(value, stats[name][b : b + 1], atol=stat_atol, rtol=1e-3)


@in_process
@pytest.mark.parametrize("kernel", KERNELS)
def test_var_params_as_tensors_equal_floats(kernel):
    """Per-row tensors holding the float values give bit-identical output and statistics."""
    q, k, v, ks, col_group, g = make_case(2, 2, 1, 5, 33, 16, (0, 2), torch.float32, seed=8)
    floats = dataclasses.replace(edits_for("all", col_group, 2, 2, 5, g), var_rho=0.7)
    rows = {n: torch.full((2,), getattr(floats, n)) for n in ("var_keep", "var_rho", "var_summ")}
    tensors = dataclasses.replace(floats, **rows)
    fn = ta.prefill_attention if kernel == "prefill" else ta.decode_attention
    want, want_stats = fn(q, k, v, scale=0.25, key_start=ks, edits=floats)
    got, got_stats = fn(q, k, v, scale=0.25, key_start=ks, edits=tensors)
    assert torch.equal(got, want)
    for name, value in want_stats.items():
        assert torch.equal(got_stats[name], value)


@in_process
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_sink_kernel_gives_the_torch_sink_test(dtype):
    """VAR's sink test in one kernel equals phi = max |x_d| / RMS(x) > tau in torch (fp32),
    padding never a sink."""
    from lvlm_fix.methods.var import sink_tokens

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 40, generator=g)
    hidden[0, 1, 5], hidden[1, 4, 9], hidden[1, 0, 5] = 30.0, -25.0, 30.0  # phi about 6
    hidden = hidden.to(dtype)
    filled = torch.ones(2, 7, dtype=torch.bool)
    filled[1, :2] = False  # left padding: row 1's first token is no sink, however large
    dims, tau = (5, 9), 4.0
    want = sink_tokens(hidden, dims, tau, filled)
    got = triton_sinks.sink_tokens(hidden, torch.tensor(dims, dtype=torch.int32), tau, filled)
    assert torch.equal(got, want)
    assert want.sum() == 2 and want[0, 1] and want[1, 4]


@in_process
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("heads", [8, 6])  # a power of two, and one the kernel pads
@pytest.mark.parametrize("outlier_filter", [True, False])
def test_vhr_kernel_gives_the_torch_head_scales(dtype, heads, outlier_filter):
    """Three samples of three rows (with image, another view, text only at 2); the second has
    no image (VHR leaves it alone); one head of sample 0 is an outlier in both measures."""
    from lvlm_fix.methods.vhr import head_scales

    g = torch.Generator().manual_seed(11 + heads)
    out = torch.randn(9, 4, heads, 16, generator=g)
    out[0, -1, 1] += 6.0  # sample 0, head 1: far from its text-only output ...
    out[2, -1, 1] *= 8.0  # ... whose norm is large too: filtered when asked
    out = out.to(dtype)
    has_image = torch.tensor([True, False, True])
    targets = torch.tensor([True, False, True] * 3)  # with image, and the counterfactual
    want = head_scales(out, 2, 3, has_image, targets, 2.0, outlier_filter)
    got = triton_vhr.head_scales(out, 2, 3, has_image, targets, 2.0, outlier_filter)
    assert torch.equal(got, want)
    assert (want[0] == 2.0).any() and (want[3:6] == 1.0).all() and (want[1] == 1.0).all()
    assert bool(want[0, 1] == 1.0) == outlier_filter  # the outlier head is dropped only then
