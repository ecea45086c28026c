"""Serving under open-loop load: request-level batching (old) vs the persistent engine (new).

    python benchmarks/serving.py --engine both --baseline-path .bench_base --out serving.json
    python benchmarks/serving.py --engine old --sizes tiny --rates 2,8 --requests 12  # CPU run
    python benchmarks/serving.py --engine http --url http://127.0.0.1:8000 --rates 8  # a server

Poisson arrivals, per rate, of one seeded request list (the same for both engines and at every
rate): 40% no intervention, 20% VHR, 20% VAR+VHR+PAI, 20% RITUAL+VCD; each request one image and a
prompt of 10-40 words the benchmark tokenizer knows; greedy. max_new_tokens is drawn from a few
values (--lengths, default 32,64,128,256), not uniformly from 32-256: the old engine batches only
requests of equal params, so with uniform lengths it would never batch. Random weights rarely
emit EOS, so most requests run to max_new_tokens; the tables count the tokens actually generated.

- old: request-level batching as the Ray Serve deployment does it at 5e3c667 (deployment.py +
  engine.run_grouped): one worker thread takes up to 8 waiting requests (waiting up to 10 ms for
  more, like `@serve.batch`), groups them by (interventions, params) and runs the groups one after
  another, each as one `LVLM.generate`. Serve answers a batch's requests together, so a request
  ends when its whole batch has. Token times: each `on_step` of the request's group (what the
  server's own Timing records). Only the public API of 5e3c667 is used.
- new: `lvlm_fix.engine.Engine` (`--slots` slots), one request per `submit`; token times: each
  listener event with a token, the end: the done event. Its constructor is timed as startup.

Per rate: completed req/s and output tok/s (from the rate's start to its last completion; with
--window-from, also the tok/s streamed inside a window of the arrivals' span), TTFT,
inter-token latency (gaps between a request's consecutive tokens, pooled), end-to-end latency, in
ms at p50/p99, and peak GPU memory. A rate ends when all its requests are done, or --timeout s
after its start: then it is marked saturated (latencies of completed requests only) and higher
rates are skipped (unless --all-rates). Warm-up requests (--warmup, one per mix entry in turn, at
the longest length, all at once) come first and are not counted.

- http: a running server at --url (`lvlm-fix serve`, e.g. with several model replicas): each
  request one streamed chat completion (`HttpEngine`); token times: the stream's content chunks.
  `benchmarks/two_gpus.py` drives it against one and two replicas.

--engine both runs old, then new, each in a subprocess: old with `lvlm_fix` from --baseline-path
(a checkout of the pre-engine commit: `git worktree add .bench_base 5e3c667`), new from this tree;
then it prints both tables and the ratios new/old.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import CORPUS, build_llava, write_json
from PIL import Image, ImageDraw

import lvlm_fix
from lvlm_fix import GenerationParams, Sample

ROOT = Path(__file__).resolve().parents[1]
MIX = [  # (share, name, interventions)
    (0.4, "none", ()),
    (0.2, "vhr", ({"name": "vhr"},)),
    (0.2, "var+vhr+pai", ({"name": "var"}, {"name": "vhr"}, {"name": "pai"})),
    (0.2, "ritual+vcd", ({"name": "ritual"}, {"name": "vcd"})),
]
LATENCIES = ("ttft", "itl", "e2e")  # time to first token, inter-token, end to end
WORDS = sorted({w.strip(".:") for w in CORPUS[0].split()} - {"USER", "ASSISTANT"})


@dataclass(frozen=True)
class Request:
    kind: str
    interventions: tuple[dict, ...]
    sample: Sample
    max_new_tokens: int


def make_request(seed: int, index: int, lengths: list[int], mix: tuple | None = None) -> Request:
    """Request `index` of the list `seed`: the same in every process."""
    rng = random.Random(seed * 1_000_003 + index)
    _, kind, interventions = mix or rng.choices(MIX, weights=[m[0] for m in MIX])[0]
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))
    image = Image.new("RGB", (400, 300), tuple(rng.randrange(256) for _ in range(3)))
    x0, x1 = sorted(rng.randrange(400) for _ in range(2))
    y0, y1 = sorted(rng.randrange(300) for _ in range(2))
    ImageDraw.Draw(image).ellipse((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in "rgb"))
    sample = Sample(text, (image,), seed=index)
    return Request(kind, interventions, sample, rng.choice(lengths))


def arrivals(seed: int, rate: float, count: int | None, duration: float) -> list[float]:
    """Poisson arrival offsets (s): the same unit-rate gaps, scaled by 1/rate, at every rate."""
    rng, times, t = random.Random(seed), [], 0.0
    while True:
        t += rng.expovariate(1.0) / rate
        enough = len(times) == count if count else t >= duration and times
        if enough:
            return times
        times.append(t)


@dataclass
class Record:
    """One request's clock: arrival, each token, and the end (time.monotonic())."""

    arrived: float = 0.0
    marks: list[float] = field(default_factory=list)
    done: float = 0.0
    tokens: int = 0
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def finish(self, tokens: int = 0, error: str | None = None, at: float | None = None) -> None:
        self.done, self.tokens, self.error = at or time.monotonic(), tokens, error
        self.finished.set()


class Abandoned(Exception):
    """Raised from on_step to stop a group once its rate has timed out."""


class OldEngine:
    """Request-level batching, as deployment.ModelServer + engine.run_grouped at 5e3c667."""

    startup_s = 0.0

    def __init__(self, lvlm, max_batch_size: int, wait_s: float):
        self.lvlm, self.max_batch_size, self.wait_s = lvlm, max_batch_size, wait_s
        self.queue: queue.Queue = queue.Queue()
        self.abandon = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, request: Request, record: Record) -> None:
        self.queue.put((request, record))

    def drain(self) -> None:
        """Drop what is queued or running (after a timeout); return once the worker is idle."""
        self.abandon.set()
        barrier = threading.Event()
        self.queue.put(barrier)
        barrier.wait()
        self.abandon.clear()

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.wait_s  # @serve.batch(batch_wait_timeout_s=0.01)
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            self._run_grouped([item for item in batch if isinstance(item, tuple)])
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()

    def _run_grouped(self, jobs: list[tuple[Request, Record]]) -> None:
        groups: dict[tuple, list[tuple[Request, Record]]] = {}
        for request, record in jobs:  # equal interventions and params (seeds are per sample)
            groups.setdefault((request.kind, request.max_new_tokens), []).append((request, record))
        answers = []
        for members in groups.values():
            records = [record for _, record in members]

            def on_step(records: list[Record] = records) -> None:
                if self.abandon.is_set():
                    raise Abandoned
                now = time.monotonic()
                for record in records:
                    record.marks.append(now)

            first = members[0][0]
            params = GenerationParams(max_new_tokens=first.max_new_tokens)
            samples = [request.sample for request, _ in members]
            if self.abandon.is_set():
                continue
            try:
                outputs = self.lvlm.generate(samples, first.interventions, params, on_step=on_step)
            except Abandoned:
                continue
            except Exception as error:  # one bad group must not fail the others
                answers += [(record, 0, repr(error)) for record in records]
                continue
            answers += [(r, len(o.token_ids), None) for r, o in zip(records, outputs, strict=True)]
        now = time.monotonic()  # Serve answers the whole batch at once
        for record, tokens, error in answers:
            record.finish(tokens, error, at=now)


class NewEngine:
    """The persistent engine of this tree (`lvlm_fix.engine`), one request per submit."""

    def __init__(self, lvlm, slots: int, max_len: int):
        where = Path(lvlm_fix.__file__).parent
        spec = importlib.util.find_spec("lvlm_fix.engine")  # not one an editable install maps in
        if spec is None or not Path(spec.origin).is_relative_to(where):
            raise SystemExit(f"--engine new: no lvlm_fix/engine.py in {where}")
        try:
            from lvlm_fix.engine import Engine, EngineConfig
        except ImportError as error:
            raise SystemExit(f"--engine new: cannot import lvlm_fix.engine: {error}") from None
        del Engine  # the LVLM owns its engine; this import only checks it exists
        self.lvlm = lvlm
        lvlm.engine_config = EngineConfig(slots=slots, max_len=max_len)
        start = time.monotonic()
        self.engine = lvlm.engine  # starts it: captures CUDA graphs on a GPU
        self.startup_s = time.monotonic() - start
        self.records: list[Record] = []

    def submit(self, request: Request, record: Record) -> None:
        def listener(event) -> None:
            if event.done:
                error = getattr(event, "error", None)
                tokens = 0 if error else len(event.generations[0].token_ids)
                record.finish(tokens, None if error is None else repr(error))
            elif event.tokens[0] is not None:
                record.marks.append(time.monotonic())

        params = GenerationParams(max_new_tokens=request.max_new_tokens)
        sample, interventions = [request.sample], request.interventions
        self.lvlm.submit(sample, interventions, params, listener=listener)
        self.records.append(record)

    def drain(self) -> None:
        """After a timeout: restart the engine if requests are still running in it."""
        if not all(record.finished.is_set() for record in self.records):
            self.lvlm.close()
            self.engine = self.lvlm.engine
        self.records = []

    def close(self) -> None:
        self.lvlm.close()


class HttpEngine:
    """A running server (`lvlm-fix serve`, Ray or not) at `url`: each request one streamed chat
    completion (its image a PNG data URL, its interventions the `interventions` field, greedy).
    Token times: each content chunk (a chunk carries the text pieces of one step or more), the
    token count: the stream's usage."""

    startup_s = 0.0

    def __init__(self, url: str, api_key: str | None = None, model: str = "lvlm-fix"):
        import asyncio

        import httpx

        self.url, self.model, self.asyncio = url, model, asyncio
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)

        async def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits)

        self.client = asyncio.run_coroutine_threadsafe(client(), self.loop).result()
        self.pending: set = set()

    def submit(self, request: Request, record: Record) -> None:
        future = self.asyncio.run_coroutine_threadsafe(self._one(request, record), self.loop)
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)

    async def _one(self, request: Request, record: Record) -> None:
        import base64
        import io

        buffer = io.BytesIO()
        request.sample.images[0].save(buffer, format="PNG")
        image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": image}},
                   {"type": "text", "text": request.sample.text}]  # fmt: skip
        body = {
            "model": self.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": request.max_new_tokens, "temperature": 0, "seed": request.sample.seed,
            "stream": True, "stream_options": {"include_usage": True},
            "interventions": list(request.interventions),
        }  # fmt: skip
        tokens, error = 0, None
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    error = f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}"
                else:
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                            record.marks.append(time.monotonic())
        except Exception as failure:  # noqa: BLE001 (recorded: the table counts failures)
            error = repr(failure)
        record.finish(tokens, error)

    def drain(self) -> None:
        """After a timeout: cancel what is still streaming (the server cancels it too)."""
        for future in list(self.pending):
            future.cancel()
        deadline = time.monotonic() + 30
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_rate(engine, requests: list[Request], times: list[float], timeout: float):
    """Submit `requests` at `times` (s) from a thread; wait until all are done or `timeout`.
    Returns the records, the start (time.monotonic()), the seconds until the last one finished
    (or the timeout) and whether it timed out."""
    records = [Record() for _ in requests]
    stop = threading.Event()
    start = time.monotonic()

    def arrive() -> None:
        for request, record, at in zip(requests, records, times, strict=True):
            if stop.wait(max(start + at - time.monotonic(), 0)):
                return
            record.arrived = time.monotonic()
            engine.submit(request, record)

    thread = threading.Thread(target=arrive, daemon=True)
    thread.start()
    for record in records:
        record.finished.wait(max(start + timeout - time.monotonic(), 0))
    timed_out = not all(record.finished.is_set() for record in records)
    stop.set()
    thread.join()
    end = time.monotonic() if timed_out else max((r.done for r in records), default=start)
    return records, start, end - start, timed_out


def window_tokens(records: list[Record], begin: float, end: float) -> float:
    """Tokens streamed between `begin` and `end`: each token mark in the window counts as its
    request's tokens per mark (a streamed chunk can carry several tokens; a request cut off by
    the timeout, whose count never came, counts one per mark)."""
    total = 0.0
    for r in records:
        inside = sum(begin <= mark < end for mark in r.marks)
        total += inside * (r.tokens / len(r.marks) if r.tokens and r.marks else 1.0)
    return total


def summarize(rate: float, records: list[Record], start: float, elapsed: float, timed_out: bool,
              window: tuple[float, float] | None = None) -> dict:  # fmt: skip
    """`window` (s from the start): also the token rate inside it (`window_tok_per_s`), e.g. the
    steady state of an overloaded run, without its ramp-up and its drain."""
    done = [r for r in records if r.finished.is_set() and r.error is None]
    latencies = {
        "ttft": [r.marks[0] - r.arrived for r in done if r.marks],
        "itl": [b - a for r in done for a, b in itertools.pairwise(r.marks[: r.tokens])],
        "e2e": [r.done - r.arrived for r in done],
    }
    tokens = sum(r.tokens for r in done)
    errors = [r.error for r in records if r.error]
    ms = {f"{name}_p{q}_ms": round(float(np.percentile(values, q)) * 1e3, 1) if values else None
          for name, values in latencies.items() for q in (50, 99)}  # fmt: skip
    steady = {}
    if window is not None:
        begin, end = window
        streamed = window_tokens(records, start + begin, start + end)
        steady = {"window_s": [begin, end], "window_tok_per_s": round(streamed / (end - begin), 1)}
    return {"rate": rate, "requests": len(records), "completed": len(done), "failed": len(errors),
            "first_error": errors[0] if errors else None, "timed_out": timed_out,
            "elapsed_s": round(elapsed, 2), "req_per_s": round(len(done) / elapsed, 3),
            "output_tokens": tokens, "output_tok_per_s": round(tokens / elapsed, 1),
            **steady, **ms}  # fmt: skip


def bench(args: argparse.Namespace) -> dict:
    """One engine over every rate, in this process (or a server's, with --url)."""
    device = args.device or ("cpu" if args.sizes == "tiny" or args.url else "cuda")
    dtype = torch.float32 if args.sizes == "tiny" else torch.bfloat16
    cuda = torch.device(device).type == "cuda" and not args.url
    lvlm = None if args.url else build_llava(args.sizes, device, dtype)
    print(f"{args.engine} engine, lvlm_fix from {Path(lvlm_fix.__file__).parent}", flush=True)
    if args.url:
        engine = HttpEngine(args.url, args.api_key)
    elif args.engine == "old":
        engine = OldEngine(lvlm, args.max_batch_size, args.batch_wait_ms / 1e3)
    else:
        engine = NewEngine(lvlm, args.slots, args.max_len)
    lengths = [int(n) for n in args.lengths.split(",")]
    warm = [make_request(args.seed + 1, i, [max(lengths)], MIX[i % len(MIX)])
            for i in range(args.warmup)]  # fmt: skip
    start = time.monotonic()
    run_rate(engine, warm, [0.0] * len(warm), timeout=600)
    engine.drain()
    warmup_s = time.monotonic() - start
    alone = batch_one_latency(engine, args.seed + 2)
    print(json.dumps({"alone_itl_p50_ms": alone}), flush=True)
    count = args.requests or None
    results, skipped = [], []
    for rate in [float(r) for r in args.rates.split(",") if r]:
        if results and results[-1]["timed_out"] and not args.all_rates:
            skipped.append(rate)
            continue
        times = arrivals(args.seed, rate, count, args.duration)
        requests = [make_request(args.seed, i, lengths) for i in range(len(times))]
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        window = None
        if args.window_from is not None:
            window = (args.window_from * max(times, default=0.0), max(times, default=0.0))
        row = summarize(rate, *run_rate(engine, requests, times, args.timeout), window)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else 0
        engine.drain()
        results.append(row)
        print(json.dumps(row), flush=True)
    if hasattr(engine, "close"):
        engine.close()
    meta = {"engine": args.engine, "model": args.url or lvlm.info.name, "dtype": str(dtype),
            "device": torch.cuda.get_device_name(device) if cuda else args.url or "cpu",
            "torch": torch.__version__, "lvlm_fix": str(Path(lvlm_fix.__file__).parent),
            "startup_s": round(engine.startup_s, 2), "warmup_s": round(warmup_s, 2),
            "skipped_rates": skipped, "args": vars(args)}  # fmt: skip
    return {"meta": meta, "alone_itl_p50_ms": alone, "results": results}


def batch_one_latency(engine, seed: int, repeats: int = 3, tokens: int = 128) -> dict[str, float]:
    """Per-token latency at batch 1 (median gap between tokens, ms): requests one at a time,
    with no intervention and with VAR+VHR+PAI."""
    alone = {}
    for entry in (MIX[0], MIX[2]):
        gaps = []
        for i in range(repeats):
            request = make_request(seed, i, [tokens], entry)
            [record], *_ = run_rate(engine, [request], [0.0], timeout=120)
            engine.drain()
            gaps += [b - a for a, b in itertools.pairwise(record.marks[: record.tokens])]
        alone[entry[1]] = round(float(np.median(gaps)) * 1e3, 2) if gaps else None
    return alone


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: dict) -> None:
    m = result["meta"]
    timing = f"startup {m['startup_s']:.1f} s, warm-up {m['warmup_s']:.1f} s"
    print(f"\n{m['engine']}: {m['model']}, {m['device']}, {m['dtype']}, {timing}, {m['lvlm_fix']}")
    print(f"batch 1, ms per token (median): {result['alone_itl_p50_ms']}")
    print("| rate/s | done | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
          "E2E p50 | E2E p99 | peak GiB |\n" + "|---" * 11 + "|")  # fmt: skip
    for r in result["results"]:
        done = f"{r['completed']}/{r['requests']}{'*' if r['timed_out'] else ''}"
        ms = " | ".join(_f(r[f"{k}_p{q}_ms"], ".1f") for k in LATENCIES for q in (50, 99))
        print(f"| {r['rate']:g} | {done} | {r['req_per_s']:.2f} | {r['output_tok_per_s']:.1f} | "
              f"{ms} | {r['peak_gib']:.2f} |")  # fmt: skip
    print("latencies in ms; * = hit --timeout (saturated): latencies of completed requests only")
    for r in result["results"]:
        if "window_tok_per_s" in r:
            begin, end = r["window_s"]
            print(f"rate {r['rate']:g}: {r['window_tok_per_s']:.1f} tok/s streamed from "
                  f"{begin:.1f} to {end:.1f} s (steady state)")  # fmt: skip
    if m["skipped_rates"]:
        print(f"skipped (saturated at a lower rate): {m['skipped_rates']}")
    if any(r["failed"] for r in result["results"]):
        print("failures:", [(r["rate"], r["failed"], r["first_error"]) for r in result["results"]])


def pythonpath(tree: Path) -> str:
    """PYTHONPATH with `tree` first and this tree left out (other entries, e.g. wheels, kept)."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return os.pathsep.join([str(tree), *(p for p in entries if p and Path(p).resolve() != ROOT)])


def drive(args: argparse.Namespace, argv: list[str]) -> int:
    """--engine both: old (baseline checkout), then new (this tree), each in a subprocess."""
    base = Path(args.baseline_path or "").resolve()
    if not args.baseline_path or not (base / "lvlm_fix").is_dir():
        raise SystemExit("--engine both needs --baseline-path: a checkout of the pre-engine commit "
                         "with lvlm_fix/ in it (git worktree add .bench_base 5e3c667)")  # fmt: skip
    runs, failures = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine, tree in (("old", base), ("new", ROOT)):
            out = Path(tmp) / f"{engine}.json"
            # the last --engine and --out of a command line count
            command = [sys.executable, __file__, *argv, "--engine", engine, "--out", str(out)]
            print(f"== {engine} engine, lvlm_fix from {tree}", flush=True)
            env = {**os.environ, "PYTHONPATH": pythonpath(tree)}
            code = subprocess.run(command, env=env).returncode
            if code == 0 and out.exists():
                runs[engine] = json.loads(out.read_text())
                if Path(runs[engine]["meta"]["lvlm_fix"]) != tree / "lvlm_fix":
                    print(f"== warning: {engine} imported {runs[engine]['meta']['lvlm_fix']}")
            else:
                failures[engine] = f"exit code {code}"
                print(f"== {engine} engine FAILED ({failures[engine]}): its output is above",
                      flush=True)  # fmt: skip
    for engine in runs:
        print_table(runs[engine])
    rows = []
    if len(runs) == 2:  # new / old at each rate both ran
        print("\n| rate/s | out tok/s new/old | TTFT p99 new/old | timed out |\n|---|---|---|---|")
        before = {r["rate"]: r for r in runs["old"]["results"]}
        for n in runs["new"]["results"]:
            if (o := before.get(n["rate"])) is None:
                continue
            tokens = _ratio(n["output_tok_per_s"], o["output_tok_per_s"])
            ttft = _ratio(n["ttft_p99_ms"], o["ttft_p99_ms"])
            late = [e for e, r in (("old", o), ("new", n)) if r["timed_out"]]
            rows.append(
                {"rate": n["rate"], "tok_per_s": tokens, "ttft_p99": ttft, "timed_out": late}
            )
            print(f"| {n['rate']:g} | {_f(tokens, '.2f')} | {_f(ttft, '.2f')} | {' '.join(late)} |")
        for kind, new in runs["new"]["alone_itl_p50_ms"].items():
            old = runs["old"]["alone_itl_p50_ms"].get(kind)
            print(f"batch 1, {kind}: {_f(new, '.2f')} ms/token new, {_f(old, '.2f')} old, "
                  f"new/old {_f(_ratio(new, old), '.3f')}")  # fmt: skip
    for engine, why in failures.items():
        print(f"\n{engine} engine: no results ({why})")
    if args.out:
        write_json(args.out, {**runs, "ratios": rows, "failures": failures})
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--engine", choices=["old", "new", "both", "http"], required=True)
    parser.add_argument("--url", default=None, help="--engine http: the server's base URL")
    parser.add_argument("--api-key", default=None, help="--engine http: its API key, if any")
    parser.add_argument("--baseline-path", help="--engine both: checkout whose lvlm_fix is 'old'")
    parser.add_argument("--sizes", choices=["llava-1.5-7b", "tiny"], default="llava-1.5-7b")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --sizes tiny)")
    parser.add_argument(
        "--rates", default="0.5,1,2,4,8,16", help='arrival rates, req/s ("": batch 1 only)'
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--duration", type=float, default=20, help="seconds of arrivals per rate")
    load.add_argument("--requests", type=int, default=0, help="requests per rate (not --duration)")
    parser.add_argument("--timeout", type=float, default=45, help="seconds per rate at most")
    parser.add_argument(
        "--window-from",
        type=float,
        default=None,
        help="also the tok/s streamed from this fraction of the arrivals' span to their end "
        "(window_tok_per_s): an overloaded run's steady state, without ramp-up or drain",
    )
    parser.add_argument("--lengths", default="32,64,128,256", help="max_new_tokens choices")
    parser.add_argument("--warmup", type=int, default=4, help="uncounted requests first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-rates", action="store_true", help="go on after a timed-out rate")
    parser.add_argument("--max-batch-size", type=int, default=8, help="old: requests per batch")
    parser.add_argument("--batch-wait-ms", type=float, default=10, help="old: wait for more")
    parser.add_argument("--slots", type=int, default=32, help="new: EngineConfig(slots=...)")
    parser.add_argument(
        "--max-len", type=int, default=2048, help="new: EngineConfig(max_len=...), cache columns"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if (args.engine == "http") != bool(args.url):
        parser.error("--engine http goes with --url (and --url with --engine http)")
    if args.engine == "both":
        sys.exit(drive(args, sys.argv[1:]))
    result = bench(args)
    print_table(result)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
