"""Load and fault tests of the PPD Serve app over loopback HTTP (numbers for BENCHMARKS.md).

    python scripts/serve_load.py                       # every mode, full size, on a local Ray it starts itself
    python scripts/serve_load.py --quick               # the reduced form (well under a minute of requests)
    python scripts/serve_load.py --modes load --requests 1000 --concurrency 16 --malformed 0.3

Modes:
- load      N requests at concurrency C, a share of them malformed (a table of 4xx cases): req/s, p50/p95/p99,
            status counts; 0 x 5xx expected.
- batching  the same generation load with the generator's batch size 1 vs serve.max_batch_size (one replica,
            switched live through Serve's `reconfigure`): images/s side by side.
- adapter   sequential latency of one image with a user (adapter on) vs without (base model, adapter off).
- kill      two generator replicas under load; one is killed through its actor: failed requests and the time
            until Serve runs two healthy replicas again.

Without --adapter-dir it serves an adapter with random non-zero weights (so adapter on != off), built with the
same factory the trainer uses. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import tenacity

CAPTIONS = ["a picture of a teal ring", "a picture of a red square", "a picture of a yellow triangle"]
APP_NAME = "ppd"


# --- request material --------------------------------------------------------------------------------------------


def png_base64(colour: tuple[int, int, int], size: int = 16, noise_seed: int | None = None) -> str:
    """A size x size PNG, plain or with random noise (noise makes PNGs large: the oversized-image case)."""
    from ppd.data.images import png_bytes

    pixels = np.full((size, size, 3), colour, dtype=np.uint8)  # [H, W, 3]
    if noise_seed is not None:
        rng = random.Random(noise_seed)
        noise = [rng.randrange(256) for _ in range(size * size * 3)]  # row by row, R G B per pixel
        pixels = np.asarray(noise, dtype=np.uint8).reshape(size, size, 3)
    return base64.b64encode(png_bytes(pixels)).decode()


def user_pairs(user: int, shots: int = 4) -> list[dict]:
    """Distinct pairs per user: the user prefers brighter images (even users) or darker ones (odd users)."""
    rng = random.Random(user)
    pairs = []
    for index in range(shots):
        dark = tuple(rng.randrange(0, 100) for _ in range(3))
        bright = tuple(rng.randrange(156, 256) for _ in range(3))
        pairs.append(
            {
                "caption": CAPTIONS[index % len(CAPTIONS)],
                "image_0": png_base64(dark),
                "image_1": png_base64(bright),
                "preferred": 1 if user % 2 == 0 else 0,
            }
        )
    return pairs


def malformed_requests(handle: str, shots: int = 4) -> list[tuple[str, str, object, int]]:
    """(name, path, JSON body or raw bytes, expected status) of the malformed cases the load mixes in."""
    good = user_pairs(0, shots)

    def with_pair(index: int, **change) -> dict:
        pairs = [dict(p) for p in good]
        pairs[index].update(change)
        return {"pairs": pairs}

    generate = {"caption": CAPTIONS[0], "steps": 2}
    return [
        ("three pairs", "/v1/users", {"pairs": good[:3]}, 422),
        ("not base64", "/v1/users", with_pair(0, image_0="%%% not base64 %%%"), 422),
        ("image URL", "/v1/users", with_pair(1, image_1="https://example.com/a.png"), 422),
        ("undecodable image", "/v1/users", with_pair(2, image_0=base64.b64encode(b"GIF89a-broken").decode()), 422),
        ("preferred 2", "/v1/users", with_pair(3, preferred=2), 422),
        ("empty caption", "/v1/generate", {**generate, "caption": "   "}, 422),
        ("caption too long", "/v1/generate", {**generate, "caption": "a" * 5000}, 422),
        ("steps 0", "/v1/generate", {**generate, "steps": 0}, 422),
        ("steps too many", "/v1/generate", {**generate, "steps": 10_000}, 422),
        ("too many images", "/v1/generate", {**generate, "num_images": 99}, 422),
        ("guidance negative", "/v1/generate", {**generate, "guidance": -1}, 422),
        ("unknown handle", "/v1/generate", {**generate, "user": "u_" + "A" * 32}, 404),
        ("mix negative", "/v1/generate", {**generate, "mix": [{"user": handle, "weight": -0.5}]}, 422),
        ("mix not summing to 1", "/v1/generate", {**generate, "mix": [{"user": handle, "weight": 0.3}] * 2}, 422),
        ("mix NaN", "/v1/generate", b'{"caption": "x", "mix": [{"user": "u", "weight": NaN}]}', 422),
        ("not JSON", "/v1/generate", b"{caption: ", 422),
        ("unknown field", "/v1/generate", {**generate, "colour": "red"}, 422),
    ]


# --- measurement ---------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    requests: int
    concurrency: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[str, int]
    server_errors: int
    unexpected: int  # responses whose status differs from the expected one
    client_errors: int  # timeouts / connection errors (a hung or dropped request)
    examples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _send(client: httpx.AsyncClient, path: str, body: object) -> int:
    if isinstance(body, bytes):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = await client.post(path, json=body)
    return response.status_code


async def run_requests(
    url: str,
    requests_to_send: list[tuple[str, object, int]],
    concurrency: int,
    token: str | None = None,
    timeout_s: float = 120,
) -> LoadReport:
    """Send (path, body, expected status) requests at a fixed concurrency; latency and status accounting."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    unexpected, client_errors, examples = 0, 0, []
    queue = list(enumerate(requests_to_send))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            nonlocal unexpected, client_errors
            while queue:
                _, (path, body, expected) = queue.pop()
                began = time.perf_counter()
                try:
                    status = await _send(client, path, body)
                except httpx.HTTPError as err:
                    client_errors += 1
                    examples.append(f"{path}: {type(err).__name__}")
                    continue
                latencies.append(time.perf_counter() - began)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status != expected:
                    unexpected += 1
                    if len(examples) < 5:
                        examples.append(f"{path}: expected {expected}, got {status}")

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    return LoadReport(
        requests=len(requests_to_send),
        concurrency=concurrency,
        seconds=round(seconds, 2),
        requests_per_s=round(len(requests_to_send) / seconds, 1),
        p50_ms=round(percentile(latencies, 50) * 1000, 1),
        p95_ms=round(percentile(latencies, 95) * 1000, 1),
        p99_ms=round(percentile(latencies, 99) * 1000, 1),
        statuses=dict(sorted(statuses.items())),
        server_errors=sum(n for s, n in statuses.items() if s.startswith("5")),
        unexpected=unexpected,
        client_errors=client_errors,
        examples=examples[:5],
    )


def register_users(url: str, count: int, token: str | None = None) -> list[str]:
    """Handles of `count` distinct users (POST /v1/users)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        handles = []
        for user in range(count):
            response = client.post("/v1/users", json={"pairs": user_pairs(user)})
            response.raise_for_status()
            handles.append(response.json()["handle"])
    return handles


def generation_requests(handles: list[str], count: int, steps: int, seed: int = 0) -> list[tuple[str, object, int]]:
    """`count` valid generation requests spread over the users (each its own user tokens) and captions."""
    rng = random.Random(seed)
    return [
        (
            "/v1/generate",
            {"caption": rng.choice(CAPTIONS), "user": handles[i % len(handles)], "steps": steps, "seed": i},
            200,
        )
        for i in range(count)
    ]


def load_plan(handles: list[str], requests: int, malformed: float, steps: int, seed: int = 0) -> list:
    """A shuffled mix: `malformed` share from the malformed table, the rest valid generations."""
    rng = random.Random(seed)
    bad = malformed_requests(handles[0])
    n_bad = round(requests * malformed)
    requests_to_send = generation_requests(handles, requests - n_bad, steps, seed)
    requests_to_send += [(path, body, status) for _, path, body, status in (bad[i % len(bad)] for i in range(n_bad))]
    rng.shuffle(requests_to_send)
    return requests_to_send


def measure_load(url: str, handles: list[str], requests: int, concurrency: int, malformed: float, steps: int) -> dict:
    return asdict(asyncio.run(run_requests(url, load_plan(handles, requests, malformed, steps), concurrency)))


def measure_batching(
    url: str, handles: list[str], requests: int, concurrency: int, steps: int, batch_size: int, wait_s: float
) -> dict:
    """Images/s with the generator's batch size 1 vs `batch_size` (one replica, reconfigured live)."""
    from ray import serve

    generator = serve.get_deployment_handle("Generator", APP_NAME)
    results = {}
    for label, size in (("unbatched", 1), ("batched", batch_size)):
        generator.reconfigure.remote({"max_batch_size": size, "batch_wait_timeout_s": wait_s}).result()
        asyncio.run(run_requests(url, generation_requests(handles, concurrency, steps, seed=99), concurrency))  # warm
        report = asyncio.run(run_requests(url, generation_requests(handles, requests, steps, seed=1), concurrency))
        results[label] = {
            "max_batch_size": size,
            "images_per_s": report.requests_per_s,
            "p50_ms": report.p50_ms,
            "p95_ms": report.p95_ms,
            "failed": report.unexpected + report.client_errors,
        }
    results["speedup"] = round(results["batched"]["images_per_s"] / results["unbatched"]["images_per_s"], 2)
    return results


def measure_adapter(url: str, handle: str, requests: int, steps: int) -> dict:
    """Sequential single-image latency with the user (adapter on) vs without (base model)."""
    timings: dict[str, list[float]] = {"adapter_on": [], "adapter_off": []}
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(requests + 2):
            for label, user in (("adapter_on", {"user": handle}), ("adapter_off", {})):
                body = {"caption": CAPTIONS[i % 3], "steps": steps, "seed": i, "response_format": "png", **user}
                began = time.perf_counter()
                client.post("/v1/generate", json=body).raise_for_status()
                if i >= 2:  # the first two rounds warm caches
                    timings[label].append((time.perf_counter() - began) * 1000)
    on, off = statistics.median(timings["adapter_on"]), statistics.median(timings["adapter_off"])
    return {
        "requests_each": requests,
        "adapter_on_p50_ms": round(on, 1),
        "adapter_off_p50_ms": round(off, 1),
        "overhead_pct": round(100 * (on / off - 1), 1),
    }


def _generator_replicas_running() -> int:
    from ray import serve

    status = serve.status().applications[APP_NAME].deployments["Generator"]
    return int(status.replica_states.get("RUNNING", 0))


def _generator_replica_actors() -> list:
    import ray

    names = [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["name"].startswith("SERVE_REPLICA::") and f"{APP_NAME}#Generator#" in entry["name"]
    ]
    return [ray.get_actor(name, namespace="serve") for name in names]


def measure_kill(
    url: str, handles: list[str], requests: int, concurrency: int, steps: int, recovery_timeout_s: float = 120
) -> dict:
    """Kill one of the generator replicas a moment into a load; failures and time to two running replicas."""
    import ray

    replicas = _generator_replica_actors()
    if len(replicas) < 2:
        raise RuntimeError(f"kill mode needs 2 generator replicas, found {len(replicas)}")
    requests_to_send = generation_requests(handles, requests, steps, seed=7)
    kill_info: dict[str, float] = {}

    async def load_and_kill() -> LoadReport:
        load = asyncio.create_task(run_requests(url, requests_to_send, concurrency))
        await asyncio.sleep(1.0)
        kill_info["killed_at"] = time.perf_counter()
        ray.kill(replicas[0], no_restart=True)  # Serve's controller notices and starts a replacement
        return await load

    report = asyncio.run(load_and_kill())
    # Recovery: Serve runs two healthy replicas again. It may first still count the killed one as RUNNING, so wait for
    # the dip below two, then for two again; both waits share the deadline (None: not recovered in time).
    deadline = kill_info["killed_at"] + recovery_timeout_s

    def until(condition) -> bool:
        return (
            tenacity.Retrying(
                stop=tenacity.stop_after_delay(max(0.0, deadline - time.perf_counter())),
                wait=tenacity.wait_fixed(0.25),
                retry=tenacity.retry_if_result(lambda running: not condition(running)),
                retry_error_callback=lambda state: None,
            )(_generator_replicas_running)
            is not None
        )

    recovered_at = None
    if until(lambda running: running < 2) and until(lambda running: running >= 2):
        recovered_at = time.perf_counter()
    failed = report.unexpected + report.client_errors
    return {
        "requests": report.requests,
        "concurrency": concurrency,
        "failed": failed,
        "failed_pct": round(100 * failed / report.requests, 2),
        "server_errors": report.server_errors,
        "statuses": report.statuses,
        "recovery_s": None if recovered_at is None else round(recovered_at - kill_info["killed_at"], 1),
        "p99_ms": report.p99_ms,
    }


# --- a local app -------------------------------------------------------------------------------------------------


def random_adapter(cfg, directory: Path, base_model: Path | None = None) -> Path:
    """A ppd adapter with random non-zero W'_v (adapter on != off) for the tiny embedder's [N, d] embeddings, on the
    tiny random Stage C or on `base_model` (a tiny Stage C folder such as assets/toy_base, recorded as its base)."""
    from ppd.models.factory import save_random_adapter

    model_cfg = cfg.model
    if base_model is not None:
        model_cfg = model_cfg.model_copy(update={"stage_c_path": str(Path(base_model).resolve())})
    return save_random_adapter(model_cfg, directory, (cfg.data.shots, 64))  # pairdiff tiny: [N = shots, 64]


def deploy(cfg, port: int) -> str:
    """Start (or update) the app on a local Ray, HTTP on 127.0.0.1:port; returns its URL once healthy."""
    import ray
    from ray import serve

    from ppd_ray.infra.ray_auth import use_private_token
    from ppd_ray.serving.app import compose

    if not ray.is_initialized():
        use_private_token()  # a local Ray of our own: its own token, nothing read from or written to $HOME
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    httpx.get(f"{url}/healthz", timeout=120).raise_for_status()
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="load,batching,adapter,kill", help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (the form the test suite runs)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--malformed", type=float, default=0.3)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="sampler steps of the generation requests")
    parser.add_argument("--batch-size", type=int, default=16, help="generator batch size of the batched run")
    parser.add_argument("--batch-requests", type=int, default=160)
    parser.add_argument("--adapter-requests", type=int, default=30)
    parser.add_argument("--kill-requests", type=int, default=400)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--adapter-dir", default=None, help="serve this adapter (default: a random one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="PPD config override")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.users, args.batch_requests = 120, 4, 32
        args.adapter_requests, args.kill_requests, args.concurrency = 5, 60, 8
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    from ray import serve

    from ppd.config import load_config

    scratch = tempfile.TemporaryDirectory(prefix="ppd-serve-load-")
    base = load_config("tiny_cpu", args.overrides)
    adapter = args.adapter_dir or str(random_adapter(base, Path(scratch.name) / "adapter"))
    overrides = [
        f"serve.adapter_dir={adapter}",
        f"serve.max_batch_size={args.batch_size}",
        f"serve.generator.max_ongoing_requests={max(4 * args.batch_size, 2 * args.concurrency)}",
        *args.overrides,
    ]
    report: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
    report["settings"]["out"] = str(args.out) if args.out else None
    began = time.perf_counter()
    try:
        if any(m in modes for m in ("load", "batching", "adapter")):
            cfg = load_config("tiny_cpu", overrides)
            url = deploy(cfg, args.port)
            handles = register_users(url, args.users)
            if "load" in modes:
                report["load"] = measure_load(url, handles, args.requests, args.concurrency, args.malformed, args.steps)
                print(json.dumps({"load": report["load"]}), file=sys.stderr, flush=True)
            if "batching" in modes:
                report["batching"] = measure_batching(
                    url, handles, args.batch_requests, args.concurrency, args.steps, args.batch_size,
                    cfg.serve.batch_wait_timeout_s,
                )  # fmt: skip
                print(json.dumps({"batching": report["batching"]}), file=sys.stderr, flush=True)
            if "adapter" in modes:
                report["adapter"] = measure_adapter(url, handles[0], args.adapter_requests, args.steps)
                print(json.dumps({"adapter": report["adapter"]}), file=sys.stderr, flush=True)
        if "kill" in modes:
            serve.delete(APP_NAME)  # a fresh app: an in-place update left the replacement replica pending here
            cfg = load_config("tiny_cpu", [*overrides, "serve.generator.replicas=2", "serve.generator.cpus=0.4"])
            url = deploy(cfg, args.port)
            handles = register_users(url, args.users)
            report["kill"] = measure_kill(url, handles, args.kill_requests, args.concurrency, args.steps)
    finally:
        serve.shutdown()
        scratch.cleanup()
    report["seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
