"""The persistent engine: requests of different plans decode in one batch, each exactly as it
would alone (and as the per-request decode loop does), joining and leaving mid-flight."""

from __future__ import annotations

import threading

import pytest
import torch

from lvlm_fix import LVLM, GenerationParams, Sample
from lvlm_fix.decoding import build_rows, decode, prefill
from lvlm_fix.engine import Cancelled, EngineConfig, Event
from lvlm_fix.search import Limits
from lvlm_fix.slots import SlotBatch, decode_edits

# VAR finds sinks in a tiny random model only with these (its defaults fit LLaMA-7B).
VAR_TINY = {"name": "var", "sink_dims": list(range(8)), "tau": 2.0}
ALL_THREE = [VAR_TINY, {"name": "vhr"}, {"name": "pai", "alpha": 1.0}]
# (interventions, params): every shared-lane kind next to the plain request, and own-lane ones.
SHARED = [
    ([], GenerationParams(max_new_tokens=14)),
    ([{"name": "vhr"}], GenerationParams(max_new_tokens=12)),
    (ALL_THREE, GenerationParams(max_new_tokens=12)),
    ([{"name": "ritual"}, {"name": "vcd"}], GenerationParams(max_new_tokens=10)),
    ([{"name": "pai"}, {"name": "pai_cfg"}], GenerationParams(max_new_tokens=9)),
    ([{"name": "m3id"}], GenerationParams(max_new_tokens=9, do_sample=True, seed=3)),
    ([], GenerationParams(max_new_tokens=11, do_sample=True, top_k=20, temperature=0.8, seed=7)),
]
OWN = [
    ([], GenerationParams(max_new_tokens=6, num_beams=2)),
    ([{"name": "fastv", "layer": 1, "keep": 4}], GenerationParams(max_new_tokens=7)),
]
QUESTIONS = ["describe this", "what color is the star in the picture on the left", "and here?"]


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision"])
def lvlm(request, tiny_paths):
    lvlm = LVLM.from_pretrained(tiny_paths[request.param], engine=EngineConfig(slots=12))
    yield lvlm
    lvlm.close()


def samples_for(index: int, images, seed: int | None) -> list[Sample]:
    question = QUESTIONS[index % len(QUESTIONS)]
    return [Sample(question, (images[index % len(images)],), seed=seed)]


def alone(lvlm: LVLM, samples, interventions, params) -> list[list[int]]:
    """The same request through the per-request decode loop (no engine)."""
    plan = lvlm.plan(interventions, params)
    tokenizer = lvlm.processor.tokenizer
    limits = Limits(
        tokenizer.eos_token_id,
        tokenizer.pad_token_id or 0,
        params.max_new_tokens,
        [torch.Generator().manual_seed(s.seed) if s.seed is not None else None for s in samples],
    )
    events = decode(lvlm.model, lvlm.processor, lvlm.info, plan, samples, limits)
    return [event for event in events if event.result is not None][0].result.tokens


def test_each_request_equals_the_per_request_loop(lvlm, images):
    for i, (interventions, params) in enumerate(SHARED + OWN):
        samples = samples_for(i, images, params.seed)
        ours = [g.token_ids for g in lvlm.generate(samples, interventions, params)]
        assert ours == alone(lvlm, samples, interventions, params), interventions


def mixed_join_equals_alone(lvlm: LVLM, images) -> None:
    """All kinds at once, each joining while the earlier ones decode: every request's tokens
    equal its tokens alone, and the shared batch really held several requests."""
    expected = []
    for i, (interventions, params) in enumerate(SHARED + OWN):
        samples = samples_for(i, images, params.seed)
        expected.append([g.token_ids for g in lvlm.generate(samples, interventions, params)])
    engine = lvlm.engine
    most_running = 0
    stepped = threading.Event()

    def listener(event: Event) -> None:
        nonlocal most_running
        most_running = max(most_running, engine.running)
        stepped.set()

    requests = []
    for i, (interventions, params) in enumerate(SHARED + OWN):
        stepped.clear()
        samples = samples_for(i, images, params.seed)
        requests.append(lvlm.submit(samples, interventions, params, listener=listener))
        stepped.wait(timeout=60)  # the newcomer joins after at least one step of the batch
    got = [[g.token_ids for g in request.result(timeout=300)] for request in requests]
    assert got == expected
    assert most_running >= 3


def test_mixed_plans_joining_mid_flight_equal_alone(lvlm, images):
    mixed_join_equals_alone(lvlm, images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_mixed_plans_joining_mid_flight_equal_alone_on_a_gpu(tiny_paths, images, family):
    """bf16, CUDA graphs, batch-invariant steps: still each request's own tokens, whatever
    joins it. (With several buckets a row's bf16 logits may differ in the last bits between
    batch sizes, as in every batching server: the matrix kernels differ.)"""
    config = EngineConfig(slots=12, batch_invariant=True)
    lvlm = LVLM.from_pretrained(tiny_paths[family], device="cuda", dtype=torch.bfloat16,
                                engine=config)  # fmt: skip
    try:
        mixed_join_equals_alone(lvlm, images)
    finally:
        lvlm.close()


def test_several_samples_of_one_request_and_their_seeds(lvlm, images):
    params = GenerationParams(max_new_tokens=8, do_sample=True)
    samples = [
        Sample(q, (im,), seed=s)
        for q, im, s in zip(QUESTIONS, (images * 2)[:3], (1, 2, 3), strict=True)
    ]
    together = [g.token_ids for g in lvlm.generate(samples, [{"name": "vcd"}], params)]
    each = [lvlm.generate([s], [{"name": "vcd"}], params)[0].token_ids for s in samples]
    assert together == each


def test_requests_of_one_plan_arriving_together_prefill_together(lvlm, images):
    """Queued behind a long request, four requests of one plan prefill in one forward (their
    rows left-padded together) and still decode exactly their tokens alone."""
    params = GenerationParams(max_new_tokens=9, do_sample=True)
    samples = [samples_for(i, images, seed=i) for i in range(4)]
    alone = [lvlm.generate(s, [{"name": "vcd"}], params)[0].token_ids for s in samples]
    engine = lvlm.engine
    stepped = threading.Event()
    blocker = lvlm.submit(samples_for(0, images, None), params=GenerationParams(max_new_tokens=40),
                          listener=lambda event: stepped.set())  # fmt: skip
    assert stepped.wait(timeout=60)
    plan = lvlm.plan([{"name": "vcd"}], params)  # compiled first: the submits take microseconds
    before = engine.prefills
    queued = [lvlm.submit(s, params=params, plan=plan) for s in samples]
    together = [request.result(timeout=120)[0].token_ids for request in queued]
    blocker.result(timeout=120)
    assert together == alone
    assert engine.prefills - before < len(samples)


def test_generations_count_the_image_tokens_pruning_removed(lvlm, images):
    """FastV keeping 4 image tokens after layer 1 (own lane) and FlowCut keeping 4 in the vision
    tower: each Generation says how many image tokens went; with no pruning, none."""
    samples = samples_for(0, images, None)
    plan = lvlm.plan([])
    full = build_rows(lvlm.processor, lvlm.info.image_token_id, plan, samples, lvlm.device)
    n_image = int(full.layout.n_image[0])
    params = GenerationParams(max_new_tokens=3)
    fastv = [{"name": "fastv", "layer": 1, "keep": 4}]
    assert lvlm.generate(samples, fastv, params)[0].image_tokens_pruned == n_image - 4
    assert lvlm.generate(samples, [], params)[0].image_tokens_pruned == 0
    if lvlm.family == "llava":  # a vision stage: fewer placeholders reach the LLM
        flowcut = [{"name": "flowcut", "budget": 4}]
        assert lvlm.generate(samples, flowcut, params)[0].image_tokens_pruned == n_image - 4


def test_cancelled_request_leaves_the_batch(lvlm, images):
    engine = lvlm.engine
    free_before = engine.slots.free_slots()
    keep_params = GenerationParams(max_new_tokens=12)
    keep_samples = samples_for(0, images, None)
    expected = [g.token_ids for g in lvlm.generate(keep_samples, [{"name": "ritual"}], keep_params)]
    steps = threading.Semaphore(0)
    doomed = lvlm.submit(
        samples_for(1, images, None), [{"name": "vhr"}], GenerationParams(max_new_tokens=60),
        listener=lambda event: steps.release(),
    )  # fmt: skip
    kept = lvlm.submit(keep_samples, [{"name": "ritual"}], keep_params)
    for _ in range(3):
        assert steps.acquire(timeout=60)
    doomed.cancel()
    with pytest.raises(Cancelled):
        doomed.result(timeout=60)
    assert [g.token_ids for g in kept.result(timeout=60)] == expected
    assert engine.slots.free_slots() == free_before
    assert engine.running == 0


def test_a_row_longer_than_the_cache_is_refused(tiny_paths, images):
    lvlm = LVLM.from_pretrained(tiny_paths["llava"], engine=EngineConfig(slots=2, max_len=40))
    with pytest.raises(ValueError, match="does not fit the engine's 40 cache columns"):
        lvlm.generate(samples_for(0, images, None), params=GenerationParams(max_new_tokens=30))
    lvlm.close()


def shared_steps_against_eager(lvlm: LVLM, images, graphs: bool, atol: float) -> None:
    """Requests of different plans placed in one SlotBatch: five shared steps give each row the
    logits its own eager steps (the per-request Runner) give, fed the same tokens."""
    info, device = lvlm.info, lvlm.device
    batch = SlotBatch(lvlm.model, info, slots=8, max_len=256, graphs=graphs, buckets=(8,))
    runners, placed = [], []
    for i, interventions in enumerate([ALL_THREE, [], [{"name": "vcd"}], [{"name": "vhr"}]]):
        plan = lvlm.plan(interventions)
        samples = samples_for(i, images, None)
        rows = build_rows(lvlm.processor, info.image_token_id, plan, samples, device)
        mine = prefill(lvlm.model, info, plan, rows, len(samples))
        ours = prefill(lvlm.model, info, plan, rows, len(samples))
        placed.append(batch.place(ours, decode_edits(ours, plan, info)))
        runners.append(mine.runner)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens, positions = [0] * 8, [0] * 8
        feeds = []
        for slots, runner in zip(placed, runners, strict=True):
            feed = torch.randint(5, info.vocab_size, (len(slots), 1), generator=generator)
            feeds.append(feed.to(device))
            for row, slot in enumerate(slots):
                tokens[slot], positions[slot] = int(feed[row]), int(runner.positions[row]) + 1
        logits = batch.step(tokens, positions)
        for slots, runner, feed in zip(placed, runners, feeds, strict=True):
            want = runner.forward(feed)[:, -1]
            torch.testing.assert_close(logits[slots], want, atol=atol, rtol=atol)


def test_shared_steps_give_each_row_its_own_logits(lvlm, images):
    shared_steps_against_eager(lvlm, images, graphs=False, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_graph_replayed_shared_steps_give_each_row_its_own_logits(tiny_paths, images, family):
    lvlm = LVLM.from_pretrained(tiny_paths[family], device="cuda", dtype=torch.bfloat16)
    shared_steps_against_eager(lvlm, images, graphs=True, atol=2e-2)
