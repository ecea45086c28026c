"""Service load test on a local Ray Serve (loopback only, bounded requests and time).

1. Throughput and p50/p99 latency of N concurrent clients, with the replica's engine holding
   one decode row (slots 1: one request at a time) and eight (slots 8), same requests, same model.
2. Robustness: 200 concurrent requests, 20% malformed: every good one must be answered (200),
   every bad one must get a 4xx, no 5xx at all, and /health must answer afterwards.

    PYTHONPATH=. python benchmarks/service.py --requests 64 --concurrency 16 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import ray  # noqa: E402
from PIL import Image  # noqa: E402
from ray import serve  # noqa: E402

from lvlm_fix.service.config import EngineSettings, ServeConfig  # noqa: E402
from lvlm_fix.service.deployment import AppArgs, build  # noqa: E402


def _image_url(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _good(i: int, max_tokens: int) -> dict:
    content = [
        {"type": "text", "text": "What is in the image?"},
        {"type": "image_url", "image_url": {"url": _image_url(("red", "green", "blue")[i % 3])}},
    ]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def _bad(i: int, max_tokens: int) -> dict:
    good = _good(i, max_tokens)
    text_only = [{"role": "user", "content": "hi"}]
    broken_image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    return [
        {**good, "interventions": [{"name": "no_such_method"}]},  # unknown intervention
        {**good, "max_tokens": -3},  # bad parameter
        {**good, "unknown_field": True},  # not in the schema
        {"messages": [{"role": "user", "content": broken_image}]},  # not an image
        {"messages": text_only, "max_tokens": 100_000},  # over the server's limit
    ][i % 5]


async def _timed(client: httpx.AsyncClient, body: dict) -> tuple[int, float, int]:
    start = time.perf_counter()
    reply = await client.post("/v1/chat/completions", json=body)
    tokens = reply.json()["usage"]["completion_tokens"] if reply.status_code == 200 else 0
    return reply.status_code, time.perf_counter() - start, tokens


async def load(url: str, requests: int, concurrency: int, max_tokens: int, limit_s: float):
    """`requests` requests from `concurrency` clients; stops starting new ones after limit_s."""
    gate = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + limit_s

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(i: int):
            async with gate:
                if time.perf_counter() > deadline:
                    return None
                return await _timed(client, _good(i, max_tokens))

        start = time.perf_counter()
        results = [r for r in await asyncio.gather(*(one(i) for i in range(requests))) if r]
        wall = time.perf_counter() - start
    latencies = sorted(r[1] for r in results)
    return {
        "requests": len(results),
        "errors": sum(r[0] != 200 for r in results),
        "wall_s": round(wall, 2),
        "req_per_s": round(len(results) / wall, 2),
        "tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


async def robustness(url: str, total: int, max_tokens: int) -> dict:
    """`total` requests at once, every fifth malformed."""
    limits = httpx.Limits(max_connections=total)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        bodies = [
            (i % 5 == 0, _bad(i // 5, max_tokens) if i % 5 == 0 else _good(i, max_tokens))
            for i in range(total)
        ]
        replies = await asyncio.gather(*(_timed(client, body) for _, body in bodies))
        healthy = (await client.get("/health")).status_code == 200
    bad = [code for (is_bad, _), (code, _, _) in zip(bodies, replies, strict=True) if is_bad]
    good = [code for (is_bad, _), (code, _, _) in zip(bodies, replies, strict=True) if not is_bad]
    return {
        "total": total,
        "good_answered": f"{sum(c == 200 for c in good)}/{len(good)}",
        "bad_4xx": f"{sum(400 <= c < 500 for c in bad)}/{len(bad)}",
        "any_5xx": any(c >= 500 for c in good + bad),
        "healthy_after": healthy,
        "passed": all(c == 200 for c in good) and all(400 <= c < 500 for c in bad) and healthy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=120, help="per load run, seconds")
    parser.add_argument("--robustness-requests", type=int, default=200)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    results = {"config": vars(args)}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for slots in (1, 8):  # engine sizes are replica arguments: the replica restarts
            app_args = AppArgs(
                model=args.model,
                num_cpus=1,
                ingress_cpus=0.5,
                engine=EngineSettings(slots=slots),
                service=ServeConfig(max_tokens_limit=256),
            )
            serve.run(build(app_args), name="bench", route_prefix="/")
            asyncio.run(load(url, 4, 4, args.max_tokens, 30))  # warm up
            run = asyncio.run(
                load(url, args.requests, args.concurrency, args.max_tokens, args.time_limit)
            )
            results[f"slots={slots}"] = run
            print(f"slots={slots}: {json.dumps(run)}", flush=True)
        check = asyncio.run(robustness(url, args.robustness_requests, args.max_tokens))
        results["robustness"] = check
        print(f"robustness: {json.dumps(check)}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
