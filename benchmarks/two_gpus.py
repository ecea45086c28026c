"""Issue #16 parts 5 and 6 on a two-GPU machine (run through benchmarks/two_gpus.sh there).

Stages (`--stages`, in this order; default: checkpoint serve eval):
  checkpoint  a LLaVA-1.5-7B-shaped random-weight checkpoint (benchmarks/common.py's model and
              tokenizer, bf16) saved with its processor to --model-dir.
  serve       `lvlm-fix serve` (Ray, loopback only) with two model replicas of `num_gpus: 1`,
              then with one, each under the same open-loop load (benchmarks/serving.py
              --engine http; 30 s of arrivals, cut 8 s after the last, and the tok/s of the
              steady state from 10 s to 30 s); per replica the requests it served (Ray Serve's
              own serve_deployment_request_counter, read from the metrics agent), GPU
              utilisation while loaded (nvidia-smi) and the CPU use of the load client, Ray's
              HTTP proxy and each replica process (psutil); every lvlm_fix and Serve metric
              after each load in metricsN.txt.
  eval        `lvlm-fix eval pope` on gym questions (python -m lvlm_fix.gym.make_eval) once with
              --ray (one GPU actor per GPU) and once in one process; the predictions compared.
  split       part 6 on the 7B checkpoint: loaded with --device-map balanced (half the layers
              on each GPU) and on one GPU; greedy tokens of VAR+VHR+PAI, RITUAL+VCD, FastV and
              plain decoding compared, and batch-1 ms per token of each.
  gputests    pytest -m gpu tests/test_device_map.py tests/test_engine.py (the tiny split
              models; the engine's graphs on one GPU).
Everything goes to --out: summary.json (every number), one log per subprocess.

    python benchmarks/two_gpus.py --out results                # the GPU machine
    python benchmarks/two_gpus.py --tiny --out /tmp/two_gpus   # CPU: tiny model, 0-GPU replicas
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.monotonic()
PLANS = {
    "none": [],
    "var+vhr+pai": [{"name": "var"}, {"name": "vhr"}, {"name": "pai"}],
    "ritual+vcd": [{"name": "ritual"}, {"name": "vcd"}],
    "fastv": [{"name": "fastv"}],
}


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f} s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(name: str, command: list[str], out: Path, timeout: float) -> int:
    """A subprocess with its output in out/name.log; its exit code (124: timed out)."""
    say(f"{name}: {' '.join(command)}")
    with open(out / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)  # fmt: skip
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            code = 124
    say(f"{name}: exit {code}")
    return code


def stop(process: subprocess.Popen, grace: float = 60) -> None:
    """Ctrl-C to the process group (serve shuts Ray down), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue


# ----- checkpoint -----


def make_checkpoint(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import SIZES, build_model

    start = time.monotonic()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model, processor = build_model(args.preset, "cpu" if args.tiny else "cuda:0", dtype)
    model.save_pretrained(args.model_dir)
    processor.save_pretrained(args.model_dir)
    size = sum(f.stat().st_size for f in Path(args.model_dir).glob("*.safetensors"))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    info = {"preset": args.preset, "name": SIZES[args.preset].name, "dtype": str(dtype),
            "path": str(args.model_dir), "gib": round(size / 2**30, 2),
            "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
    say(f"checkpoint: {info}")
    return info


# ----- serve -----


class Sampler:
    """Calls `sample()` every second on a thread while in its `with` block (until it returns
    False); `samples` collects values by label."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopped.wait(1.0) and self.sample():
            pass

    def sample(self) -> bool:
        raise NotImplementedError

    def add(self, label: str, value: float) -> None:
        self.samples.setdefault(label, []).append(value)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(10)


class GpuSampler(Sampler):
    """nvidia-smi every second: mean and peak utilisation per GPU."""

    QUERY = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
             "--format=csv,noheader,nounits"]  # fmt: skip

    def sample(self) -> bool:
        try:
            text = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False  # no GPU tools here
        for line in text.strip().splitlines():
            index, util, memory = (part.strip() for part in line.split(","))
            self.add(index, float(util))
            self.add(f"{index}.memory_mib", float(memory))
        return True

    def summary(self) -> dict:
        out = {}
        for key, values in self.samples.items():
            if key.endswith(".memory_mib"):
                out[key.replace(".memory_mib", "")]["memory_mib_max"] = max(values)
            else:
                busy = [v for v in values if v > 0]
                out[key] = {"util_mean": round(sum(values) / len(values), 1),
                            "util_max": max(values), "seconds_busy": len(busy),
                            "samples": len(values)}  # fmt: skip
        return out


class CpuSampler(Sampler):
    """Every second: CPU use (% of one core) of each process on the serving path, the load
    client, Ray Serve's HTTP proxy, and the ingress and model replicas, to find which one caps
    throughput (a process near 100% is bound by its one Python thread)."""

    WATCHED = ("ray::ProxyActor", "ray::ServeReplica", "benchmarks/serving.py")

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[str, object]] = {}  # pid -> (label, psutil.Process)

    def sample(self) -> bool:
        import psutil

        for process in psutil.process_iter(["pid", "cmdline"]):
            command = " ".join(process.info["cmdline"] or ())
            if process.pid not in self.watched and any(w in command for w in self.WATCHED):
                label = command.split(" ")[0] if command.startswith("ray::") else "client"
                self.watched[process.pid] = (f"{label} ({process.pid})", process)
                process.cpu_percent(None)  # the first call only starts the count
        for pid, (label, process) in list(self.watched.items()):
            try:
                self.add(label, process.cpu_percent(None))
            except psutil.Error:  # it exited
                del self.watched[pid]
        return True

    def summary(self) -> dict:
        """Per process: mean and peak % of one core over the samples while it was busy."""
        out = {}
        for label, values in sorted(self.samples.items()):
            busy = [v for v in values if v > 5] or [0.0]
            out[label] = {"cpu_mean_busy": round(sum(busy) / len(busy), 1), "cpu_max": max(values)}
        return out


def replica_requests(metrics_port: int) -> dict[str, float]:
    """Requests each ModelServer replica processed (Ray Serve's counter, summed over routes)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ray_serve_deployment_request_counter") or "ModelServer" not in line:
            continue
        replica = re.search(r'replica="([^"]*)"', line)
        name = replica.group(1) if replica else "?"
        counts[name] = counts.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def save_metrics(metrics_port: int, path: Path) -> None:
    """Our metrics and Serve's, as the metrics agent exports them (per replica process)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    kept = [line for line in text.splitlines() if "lvlm_fix" in line or "ray_serve" in line]
    path.write_text("\n".join(kept) + "\n")


def serve_and_load(args, replicas: int, out: Path) -> dict:
    port, metrics_port = free_port(), free_port()
    config = {
        "model": str(args.model_dir),
        "device": "cpu" if args.tiny else "cuda",
        "num_replicas": replicas,
        "num_gpus": 0 if args.tiny else 1,
        "num_cpus": 0.5 if args.tiny else 1,
        "ingress_cpus": 0.25 if args.tiny else 1,
        # one HTTP app replica per model replica, so that the HTTP side (images decoded, plans
        # compiled, every streamed token relayed) grows with the engines it feeds
        "ingress_replicas": replicas,
        "engine": {"slots": args.slots, "max_len": args.max_len},
        "service": {"max_tokens_limit": 1024},
        "host": "127.0.0.1",
        "port": port,
    }
    path = out / f"serve{replicas}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    command = [sys.executable, "-m", "lvlm_fix.cli", "serve", "--config", str(path),
               "--metrics-port", str(metrics_port)]  # fmt: skip
    if args.num_cpus:
        command += ["--num-cpus", str(args.num_cpus)]
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}
    say(f"serve, {replicas} replica(s): {' '.join(command)}")
    log_path = out / f"serve{replicas}.log"
    result: dict = {"replicas": replicas, "config": config}
    started = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env=env, start_new_session=True)  # fmt: skip
        try:
            while "ready:" not in log_path.read_text(errors="replace"):
                if server.poll() is not None or time.monotonic() - started > args.start_timeout:
                    result["error"] = "the server did not start (see its log)"
                    say(f"serve, {replicas} replica(s): {result['error']}")
                    return result
                time.sleep(1)
            result["startup_s"] = round(time.monotonic() - started, 1)
            say(f"serve, {replicas} replica(s): ready after {result['startup_s']} s")
            load = out / f"load{replicas}.json"
            command = [sys.executable, "benchmarks/serving.py", "--engine", "http",
                       "--url", f"http://127.0.0.1:{port}", "--rates", args.rates,
                       "--duration", str(args.duration), "--timeout", str(args.load_timeout),
                       "--lengths", args.lengths, "--warmup", str(args.warmup),
                       "--window-from", str(args.window_from), "--out", str(load)]  # fmt: skip
            before = replica_requests(metrics_port)
            with GpuSampler() as gpus, CpuSampler() as cpus:
                result["load_exit"] = run(f"load{replicas}", command, out, args.load_budget)
            result["cpu"] = cpus.summary()
            if load.exists():
                result["load"] = json.loads(load.read_text())
            result["gpus"] = gpus.summary()
            time.sleep(3)  # the replicas report every second (RAY_metrics_report_interval_ms)
            after = replica_requests(metrics_port)
            save_metrics(metrics_port, out / f"metrics{replicas}.txt")
            result["replica_requests"] = {
                name: after[name] - before.get(name, 0.0) for name in sorted(after)
            }
            say(f"serve, {replicas} replica(s): requests per replica "
                f"{result['replica_requests']}; GPUs {result['gpus']}")  # fmt: skip
            say(f"serve, {replicas} replica(s): CPU, % of a core {result['cpu']}")
        finally:
            stop(server)
    return result


# ----- eval -----


def evaluate(args, out: Path) -> dict:
    data = Path(args.eval_dir)
    if not (data / "gym_pope_random.json").exists():
        run("make_eval", [sys.executable, "-m", "lvlm_fix.gym.make_eval", str(data)], out, 300)
    common = [sys.executable, "-m", "lvlm_fix.cli", "eval", "pope", "--model",
              str(args.model_dir), "--images", str(data / "images"),
              "--data", str(data / "gym_pope_random.json"),
              "--data", str(data / "gym_pope_adversarial.json"),
              "--limit", str(args.eval_limit), "--method", "var+vhr+pai=var;vhr;pai",
              "--method", "ritual+vcd=ritual;vcd", "--bootstrap", "0", "--no-progress",
              "--device", "cpu" if args.tiny else "cuda"]  # fmt: skip
    runs = {}
    for name, extra in (("ray", ["--ray", "--workers", "2"]), ("local", [])):
        folder = out / f"eval_{name}"
        started = time.monotonic()
        code = run(f"eval_{name}", [*common, "--out", str(folder), *extra], out,
                   args.eval_budget)  # fmt: skip
        lines = []
        if (folder / "predictions.jsonl").exists():
            lines = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        metrics = folder / "metrics.json"
        runs[name] = {
            "exit": code,
            "wall_s": round(time.monotonic() - started, 1),
            "answers": {f"{x['method']}|{x['key']}": (x["answer"], x["n_tokens"]) for x in lines},
            "metrics": json.loads(metrics.read_text())["methods"] if metrics.exists() else None,
        }
    ray, local = runs["ray"]["answers"], runs["local"]["answers"]
    differ = sorted(k for k in set(ray) | set(local) if ray.get(k) != local.get(k))
    result = {
        "predictions": {"ray": len(ray), "local": len(local)},
        "identical": bool(ray) and not differ,
        "differing": differ[:20],
        "n_differing": len(differ),
        **{f"{name}_wall_s": r["wall_s"] for name, r in runs.items()},
        **{f"{name}_exit": r["exit"] for name, r in runs.items()},
        "metrics": {name: r["metrics"] for name, r in runs.items()},
    }
    say(f"eval: {len(ray)} predictions with --ray, {len(local)} in one process, "
        f"{len(differ)} differ")  # fmt: skip
    return result


# ----- split (part 6) -----


def split_check(args, out: Path) -> dict:
    """The 7B checkpoint split over both GPUs vs on one: tokens and batch-1 ms per token."""
    import torch
    from PIL import Image, ImageDraw

    from lvlm_fix import LVLM, GenerationParams, Sample
    from lvlm_fix.engine import EngineConfig
    from lvlm_fix.model import layer_devices

    image = Image.new("RGB", (400, 300), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((60, 40, 300, 260), fill=(220, 180, 30))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import CORPUS

    text = " ".join(CORPUS[0].split()[3:20])
    samples = [Sample(text, (image,))]
    params = GenerationParams(max_new_tokens=args.split_tokens)
    # a split model's shared steps: transformers' layers, eagerly
    eager = EngineConfig(slots=4, max_len=2048, graphs=False, fused_step=False)
    one = {"device": "cpu" if args.tiny else "cuda:0"}
    loads = {  # the split model against the same engine on one GPU, then its default engine
        "split": ({"device_map": "balanced"}, eager),
        "one_gpu": (one, eager),
        "one_gpu_graphs": (one, EngineConfig(slots=4, max_len=2048)),
    }
    result: dict = {}
    for name, (where, config) in loads.items():
        started = time.monotonic()
        lvlm = LVLM.from_pretrained(args.model_dir, engine=config, **where)
        loaded = round(time.monotonic() - started, 1)
        devices = sorted({str(d) for d in layer_devices(lvlm.model, lvlm.family)})
        row = {"load_s": loaded, "layer_devices": devices}
        for plan_name, plan in PLANS.items():
            lvlm.generate(samples, plan, GenerationParams(max_new_tokens=4))  # warm-up
            marks: list[float] = []
            started = time.monotonic()
            [gen] = lvlm.generate(samples, plan, params, on_step=_marker(marks))
            gaps = sorted(b - a for a, b in zip(marks, marks[1:], strict=False))
            row[plan_name] = {
                "tokens": gen.token_ids,
                "ms_per_token_p50": round(1e3 * gaps[len(gaps) // 2], 2) if gaps else None,
                "first_token_ms": round(1e3 * (marks[0] - started), 1) if marks else None,
            }
        result[name] = row
        say(f"split: {name} on {devices}: " + ", ".join(
            f"{p} {row[p]['ms_per_token_p50']} ms/token" for p in PLANS))  # fmt: skip
        lvlm.close()
        del lvlm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["same_tokens"] = {
        p: result["one_gpu"][p]["tokens"] == result["split"][p]["tokens"] for p in PLANS
    }
    result["same_prefix"] = {
        p: _common_prefix(result["one_gpu"][p]["tokens"], result["split"][p]["tokens"])
        for p in PLANS
    }
    say(f"split: same tokens {result['same_tokens']}, common prefix {result['same_prefix']}")
    return result


def _marker(marks: list[float]):
    return lambda: marks.append(time.monotonic())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ----- main -----


def environment() -> dict:
    import torch
    import transformers

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
            "gpus": gpus}  # fmt: skip
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    try:
        smi = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(smi, capture_output=True, text=True).stdout.strip()
    except OSError:
        info["nvidia_smi"] = None
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny model, 0-GPU replicas")
    parser.add_argument("--stages", default="checkpoint,serve,eval")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--eval-dir", default="/tmp/gym_eval")
    parser.add_argument("--rates", default=None, help="load: arrival rate(s), req/s")
    parser.add_argument("--duration", type=float, default=None, help="load: seconds of arrivals")
    parser.add_argument("--load-timeout", type=float, default=None, help="load: s per rate")
    parser.add_argument(
        "--window-from",
        type=float,
        default=None,
        help="load: steady tok/s from this fraction of the arrivals to their end",
    )
    parser.add_argument("--lengths", default=None, help="load: max_tokens choices")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--slots", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--num-cpus", type=float, default=None, help="local Ray's CPUs")
    parser.add_argument("--replicas", default="2,1", help="serve runs, in order")
    parser.add_argument("--eval-limit", type=int, default=None, help="POPE questions per split")
    parser.add_argument("--split-tokens", type=int, default=None)
    args = parser.parse_args()
    tiny = args.tiny
    args.preset = "tiny" if tiny else "llava-1.5-7b"
    args.model_dir = args.model_dir or Path("/tmp/two_gpus_tiny" if tiny else "/tmp/llava7b")
    defaults = {  # (tiny, GPU)
        "rates": ("4", "20"), "duration": (4, 30), "load_timeout": (30, 38),
        "window_from": (0.5, 1 / 3), "lengths": ("8,16", "32,64,128,256"), "slots": (8, 32),
        "eval_limit": (4, 30), "split_tokens": (16, 64),
    }  # fmt: skip
    for key, (small, large) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else large)
    if tiny and args.num_cpus is None:
        args.num_cpus = 4  # fractional replicas on a 2-core machine
    args.start_timeout = 240 if tiny else 300
    args.load_budget = args.load_timeout * len(args.rates.split(",")) + 200
    args.eval_budget = 400 if tiny else 300
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "env": environment()}
    say(f"environment: {summary['env']}")
    stages = args.stages.split(",")

    def save() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    if "checkpoint" in stages:
        summary["checkpoint"] = make_checkpoint(args)
        save()
    if "serve" in stages:
        runs = [serve_and_load(args, int(n), out) for n in args.replicas.split(",")]
        summary["serve"] = runs
        by = {r["replicas"]: r for r in runs if r.get("load")}
        for key in ("output_tok_per_s", "window_tok_per_s"):  # whole run; steady state
            tok = {n: r["load"]["results"][-1].get(key) for n, r in by.items()
                   if r["load"]["results"]}  # fmt: skip
            if tok.get(1) and tok.get(2):
                scaling = {"tok_per_s": tok, "two_over_one": round(tok[2] / tok[1], 2)}
                summary.setdefault("serve_scaling", {})[key] = scaling
                say(f"serve: {key} {tok}, 2 replicas / 1 = {scaling['two_over_one']}")
        save()
    if "eval" in stages:
        summary["eval"] = evaluate(args, out)
        save()
    if "split" in stages:
        summary["split"] = split_check(args, out)
        save()
    if "gputests" in stages:
        tests = ["tests/test_device_map.py", "tests/test_engine.py"]
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                   "-o", "addopts=", *tests]  # fmt: skip
        code = run("gputests", command, out, 420)
        tail = (out / "gputests.log").read_text(errors="replace").strip().splitlines()[-15:]
        summary["gputests"] = {"exit": code, "tests": tests, "tail": tail}
        say("gputests: " + (tail[-1] if tail else "no output"))
        save()
    say(f"done: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
