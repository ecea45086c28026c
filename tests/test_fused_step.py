"""The fused decode step (fused_step.py): the logits of transformers' forward, interventions
included, on weights it shares with the model rather than copies."""

from __future__ import annotations

import pytest
import torch

from lvlm_fix import LVLM, Sample
from lvlm_fix.decoding import build_rows, prefill
from lvlm_fix.fused_step import FusedDecoder
from lvlm_fix.model import FAMILIES, resolve
from lvlm_fix.slots import SlotBatch, decode_edits

VAR_TINY = {"name": "var", "sink_dims": list(range(8)), "tau": 2.0}  # sinks in a random model
ALL_THREE = [VAR_TINY, {"name": "vhr"}, {"name": "pai", "alpha": 1.0}]
REQUESTS = [ALL_THREE, [], [{"name": "vcd"}], [{"name": "vhr"}]]


def place_requests(lvlm: LVLM, images, batches: list[SlotBatch], edits: bool = True,
                   requests: list[list[dict]] = REQUESTS):  # fmt: skip
    """Prefill each request once and place it in every batch (with its decode edits, or none);
    returns each request's (slots, position of its last prompt token)."""
    info, placed = lvlm.info, []
    for i, interventions in enumerate(requests):
        plan = lvlm.plan(interventions)
        samples = [Sample("describe this", (images[i % len(images)],))]
        rows = build_rows(lvlm.processor, info.image_token_id, plan, samples, lvlm.device)
        prefilled = prefill(lvlm.model, info, plan, rows, len(samples))
        layer_edits = decode_edits(prefilled, plan, info)
        if not edits:
            layer_edits = [None] * len(layer_edits)
        slots = {tuple(batch.place(prefilled, layer_edits)) for batch in batches}
        assert len(slots) == 1
        placed.append((list(slots.pop()), int(prefilled.runner.positions[0])))
    return placed


def step_all(batches: list[SlotBatch], placed, vocab: int, steps: int = 5):
    """`steps` shared steps of every batch (in the bucket of the rows placed) fed the same
    random tokens: each step's logits."""
    generator = torch.Generator().manual_seed(0)
    rows_stepped = batches[0].bucket()
    for step in range(steps):
        tokens, positions = [0] * rows_stepped, [0] * rows_stepped
        for rows, position in placed:
            for slot in rows:
                tokens[slot] = int(torch.randint(5, vocab, (1,), generator=generator))
                positions[slot] = position + 1 + step
        yield [batch.step(tokens, positions) for batch in batches]


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_fused_step_gives_transformers_logits_with_and_without_edits(tiny_paths, images, family):
    """Rows with VAR+VHR+PAI tables, VHR alone, VCD's views and no intervention in one batch:
    every step's logits are those of transformers' forward with our attention."""
    lvlm = LVLM.from_pretrained(tiny_paths[family])
    info = lvlm.info
    batches = [SlotBatch(lvlm.model, info, 8, 256, graphs=False, buckets=(8,), fused=fused)
               for fused in (False, True)]  # fmt: skip
    assert batches[0].decoder is None and batches[1].decoder is not None
    placed = place_requests(lvlm, images, batches)
    [tables] = batches[1].tables.parts.values()  # one device; VAR, PAI and VHR are all in it
    assert tables.var_rows.any() and tables.image_gain.any() and (tables.head_scale != 1).any()
    for plain, fused in step_all(batches, placed, info.vocab_size):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_the_edits_change_the_fused_step(tiny_paths, images):
    """The same rows with and without their decode edits: the VAR+VHR+PAI and VHR rows differ,
    the others do not (the edits reach the fused step, and only where they belong)."""
    lvlm = LVLM.from_pretrained(tiny_paths["llava"])
    edited, bare = (SlotBatch(lvlm.model, lvlm.info, 8, 256, graphs=False, buckets=(8,))
                    for _ in range(2))  # fmt: skip
    placed = place_requests(lvlm, images, [edited])
    assert place_requests(lvlm, images, [bare], edits=False) == placed
    for with_edits, without in step_all([edited, bare], placed, lvlm.info.vocab_size, steps=2):
        differs = [not torch.equal(with_edits[rows], without[rows]) for rows, _ in placed]
        assert differs == [True, False, False, True]


def test_fusing_shares_the_modules_memory(tiny_paths):
    """Wrapping a model fuses its q/k/v and gate/up weights in its own memory (the modules'
    weights become views of the fused tensors), a decoder reuses them, and transformers' forward
    is unchanged."""
    family = "llava_onevision"  # Qwen2: q/k/v biases too
    spec = FAMILIES[family]
    model = spec.model_class.from_pretrained(tiny_paths[family])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    bytes_before = sum(p.nbytes for p in model.parameters())
    lvlm = LVLM(model, spec.processor_class.from_pretrained(tiny_paths[family]))
    layers = resolve(model, spec.decoder_layers)
    q, k = layers[0].self_attn.q_proj.weight, layers[0].self_attn.k_proj.weight
    assert k.data_ptr() == q.data_ptr() + q.nbytes  # fused at load, before any engine starts
    decoder = FusedDecoder(model, lvlm.info, columns=64)
    for layer, weights in zip(layers, decoder.weights, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        fused = [(weights.qkv, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                 (weights.qkv_bias, [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
                 (weights.gate_up, [mlp.gate_proj.weight, mlp.up_proj.weight])]  # fmt: skip
        for whole, parts in fused:
            address = whole.data_ptr()
            for part in parts:
                assert part.data_ptr() == address
                assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
                address += part.nbytes
            assert address == whole.data_ptr() + whole.nbytes
    again = FusedDecoder(model, lvlm.info, columns=64)
    assert [w.qkv.data_ptr() for w in again.weights] == [w.qkv.data_ptr() for w in decoder.weights]
    assert sum(p.nbytes for p in model.parameters()) == bytes_before
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_models_the_fused_step_cannot_run_take_transformers_forward(tiny_paths, images,
                                                                   monkeypatch):  # fmt: skip
    lvlm = LVLM.from_pretrained(tiny_paths["llava"])
    monkeypatch.setattr("lvlm_fix.fused_step.ARCHITECTURES", ("qwen2",))  # as if Llama were not
    batch = SlotBatch(lvlm.model, lvlm.info, 8, 256, graphs=False, buckets=(8,))
    assert batch.decoder is None
    placed = place_requests(lvlm, images, [batch])
    assert next(step_all([batch], placed, lvlm.info.vocab_size, steps=1))[0].isfinite().all()
    with pytest.raises(ValueError, match="captures CUDA graphs of its own"):
        FusedDecoder(lvlm.model, lvlm.info, 256, compile_mode="max-autotune")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_compiled_fused_graphs_give_the_transformers_graphs_logits(tiny_paths, images, family):
    """bf16 on a GPU: the fused step, compiled and replayed from CUDA graphs (buckets 8, 4 and
    1), against transformers' forward replayed the same way, with and without edit tables."""
    lvlm = LVLM.from_pretrained(tiny_paths[family], device="cuda", dtype=torch.bfloat16)
    batches = [SlotBatch(lvlm.model, lvlm.info, 8, 256, graphs=True, buckets=(1, 4, 8),
                         fused=fused) for fused in (False, True)]  # fmt: skip
    assert batches[0].decoder is None and batches[1].decoder is not None
    assert set(batches[1].graphs) == {(rows, e) for rows in (1, 4, 8) for e in (False, True)}
    placed = place_requests(lvlm, images, batches)  # bucket 8 with edits
    for plain, fused in step_all(batches, placed, lvlm.info.vocab_size):
        torch.testing.assert_close(fused, plain, atol=2e-2, rtol=2e-2)
    for alone in ([], ALL_THREE):  # one row at slot 0: bucket 1 without and with edits
        for batch in batches:
            batch.release([s for rows, _ in placed for s in rows])
        placed = place_requests(lvlm, images, batches, requests=[alone])
        for plain, fused in step_all(batches, placed, lvlm.info.vocab_size, steps=3):
            torch.testing.assert_close(fused, plain, atol=2e-2, rtol=2e-2)
