"""Judge evaluation on held-out labels: queries from a prepared toy world, the oracle, the consistency protocol."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppd.config import smoke
from ppd.eval.evaluate import read_split
from ppd.eval.judge import JudgeQuery, parse_answer
from ppd.eval.judge_eval import (
    JUDGE_CHAT_TEMPLATE,
    evaluate_judge,
    judge_queries,
    judge_server_command,
    make_judge,
)
from ppd.eval.report import render_results_markdown
from tests.helpers import prepared_population


@pytest.fixture(scope="module")
def prepared(ray_local, toy_world, tmp_path_factory, smoke_config) -> Path:
    """The prepare job's real output for the smoke toy world (shared with the Stage-2 tests: built once)."""
    return prepared_population(tmp_path_factory, toy_world, smoke_config)


def _split_rows(prepared: Path, split: str) -> pd.DataFrame:
    return read_split(prepared, split)


@pytest.mark.parametrize("split", ["test_seen", "test_unseen"])
def test_queries_are_held_out_pairs_judged_from_the_users_own_other_pairs(prepared, split):
    queries, truth = judge_queries(prepared, split, count=40, seed=0)
    assert 5 <= len(queries) == len(truth) <= 40
    rows = _split_rows(prepared, split)
    groups = pq.read_table(prepared / "groups").to_pandas().set_index("group_id")
    for query, label in zip(queries, truth, strict=True):
        match = rows[(rows.jpg_0 == query.image_a) & (rows.jpg_1 == query.image_b) & (rows.caption == query.caption)]
        assert len(match) == 1
        row = match.iloc[0]
        assert int(row.user_id) == query.user_id
        assert label == (0 if row.label_0 == 1.0 else 1)  # truth is the user's label (0 = jpg_0 = image_a)
        context = groups.loc[int(row.condition_group_id)]
        assert int(context.user_id) == query.user_id and int(row.pair_id) not in list(context.pair_ids)
        assert list(query.context_captions) == list(context.captions) and len(query.context_captions) == 4
        assert list(query.context_first) == list(context.jpg_0) and list(query.context_second) == list(context.jpg_1)
        assert list(query.context_preferred) == list(context.preferred)
        assert query.caption not in query.context_captions
    assert len(set(map(id, queries))) == len(queries)


def test_a_pair_whose_caption_is_in_its_context_is_skipped(prepared, tmp_path):
    """A user may label the same caption twice; the judge must not see the judged caption among its examples."""
    shutil.copytree(prepared, tmp_path / "p")
    rows = _split_rows(tmp_path / "p", "test_unseen")
    groups = pq.read_table(prepared / "groups").to_pandas().set_index("group_id")
    conditioned = rows[rows.condition_group_id.notna()]
    before, _ = judge_queries(tmp_path / "p", "test_unseen", count=10_000, seed=0)
    assert len(before) == len(conditioned)  # the smoke world has no such pair: every conditioned pair is used
    leaking = conditioned.index[0]
    rows.loc[leaking, "caption"] = groups.loc[int(rows.loc[leaking, "condition_group_id"])].captions[2]
    for file in (tmp_path / "p" / "test_unseen").glob("*.parquet"):
        file.unlink()
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "p" / "test_unseen" / "part.parquet")
    after, _ = judge_queries(tmp_path / "p", "test_unseen", count=10_000, seed=0)
    assert len(after) == len(before) - 1
    assert rows.loc[leaking, "jpg_0"] not in {q.image_a for q in after}


def test_query_choice_is_seeded_and_spread_over_users(prepared):
    first, truth = judge_queries(prepared, "test_seen", count=12, seed=3)
    again, truth_again = judge_queries(prepared, "test_seen", count=12, seed=3)
    other, _ = judge_queries(prepared, "test_seen", count=12, seed=4)
    assert first == again and truth == truth_again
    assert [q.caption for q in first] != [q.caption for q in other]
    users = _split_rows(prepared, "test_seen").user_id.nunique()
    assert len({q.user_id for q in first}) == min(12, users)  # one pair per user before anyone's second


def test_oracle_matches_the_toy_users_labels(prepared, toy_world):
    queries, truth = judge_queries(prepared, "test_seen", count=120, seed=0)
    judge = make_judge(smoke(), toy_world)
    result = evaluate_judge(queries, truth, judge.ask, judge.backend, bootstrap_samples=200)
    # Labels are Bradley-Terry draws from the same hidden rewards: the oracle agrees with ~90% of them.
    assert result["backend"] == "oracle" and result["pairs"] == len(queries) >= 100
    assert result["accuracy"] > 0.8
    assert result["dropped_share"] < 0.05  # only exact reward ties are inconsistent
    low, high = result["accuracy_ci95"]
    assert low <= result["accuracy"] <= high and high - low < 0.3
    # The same oracle on flipped labels must fail: the agreement comes from the labels, not from the protocol.
    flipped = evaluate_judge(queries, [1 - t for t in truth], judge.ask, judge.backend, bootstrap_samples=200)
    assert flipped["accuracy"] == pytest.approx(1 - result["accuracy"])
    json.dumps(result)  # results.json material


def test_oracle_needs_the_user_and_the_world(prepared, toy_world):
    queries, _ = judge_queries(prepared, "test_seen", count=1, seed=0)
    anonymous = JudgeQuery(**{**queries[0].__dict__, "user_id": None})
    with pytest.raises(ValueError, match="user_id"):
        make_judge(smoke(), toy_world).ask(anonymous, False)
    with pytest.raises(ValueError, match="toy world"):
        make_judge(smoke(), None)


def test_each_query_is_asked_in_both_orders_and_inconsistent_verdicts_are_dropped(prepared):
    queries, truth = judge_queries(prepared, "test_seen", count=20, seed=0)
    calls: list[tuple[int, bool]] = []

    def always_first(query: JudgeQuery, swapped: bool) -> int:
        calls.append((id(query), swapped))
        return 0  # position bias: contradicts itself on every swap

    result = evaluate_judge(queries, truth, always_first, "biased", bootstrap_samples=100)
    assert sorted(calls) == sorted((id(q), s) for q in queries for s in (False, True))
    assert result["dropped"] == result["pairs"] == 20 and result["dropped_share"] == 1.0 and result["kept"] == 0
    assert np.isnan(result["accuracy"])

    def prefers_image_b(query: JudgeQuery, swapped: bool) -> int:
        return 0 if swapped else 1  # image_b is shown first when swapped: a consistent verdict

    result = evaluate_judge(queries, truth, prefers_image_b, "b", bootstrap_samples=100)
    assert result["dropped"] == 0 and result["preferred"] == [1] * 20
    assert result["accuracy"] == pytest.approx(np.mean(np.asarray(truth) == 1))

    def unparsable_when_swapped(query: JudgeQuery, swapped: bool) -> int | None:
        return parse_answer("I cannot tell" if swapped else "Image 2")

    result = evaluate_judge(queries, truth, unparsable_when_swapped, "mute", bootstrap_samples=100)
    assert result["dropped_share"] == 1.0


def test_judge_results_render_in_the_report(prepared, toy_world):
    queries, truth = judge_queries(prepared, "test_seen", count=30, seed=0)
    judge = make_judge(smoke(), toy_world)
    result = evaluate_judge(queries, truth, judge.ask, judge.backend, bootstrap_samples=100)
    text = render_results_markdown([{"seed": 0, "judge": result}], "ppd demo")
    assert "backend `oracle` on 30 held-out pairs" in text
    assert f"{100 * result['accuracy']:.0f}%" in text and f"{100 * result['dropped_share']:.0f}%" in text


class _ChatEndpoint(http.server.BaseHTTPRequestHandler):
    """A real OpenAI-compatible endpoint on loopback: records each request, answers with a reasoned verdict."""

    seen: list[dict] = []
    reply = "Pair 1: image 1 is darker than image 2 ... User Profile: likes bright images.\nPreference: 2"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _ChatEndpoint.seen.append({"path": self.path, "authorization": self.headers.get("authorization"), "body": body})
        answer = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": self.reply}}],
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def chat_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ChatEndpoint.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_openai_judge_runs_the_b3_protocol_from_config(monkeypatch, prepared, chat_endpoint):
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret-token")
    cfg = smoke().with_overrides(
        [
            "eval.judge=openai",
            f"eval.judge_base_url={chat_endpoint}",
            "eval.judge_model=judge-model",
            "eval.judge_api_key_env=TEST_JUDGE_KEY",
        ]
    )
    judge = make_judge(cfg, None)
    queries, truth = judge_queries(prepared, "test_seen", count=2, seed=0)
    result = evaluate_judge(queries, truth, judge.ask, judge.backend, bootstrap_samples=100)
    seen = _ChatEndpoint.seen
    assert judge.backend == "openai:judge-model" and len(seen) == 4  # 2 pairs x both orders
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["authorization"] == "Bearer secret-token"
    body = seen[0]["body"]
    # supplementary B.3: sampled at temperature 1.0 and top-p 1.0, with room to reason, a system role first
    assert (body["model"], body["temperature"], body["top_p"]) == ("judge-model", 1.0, 1.0)
    assert body["max_tokens"] == cfg.eval.judge_max_tokens
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    texts = " ".join(part["text"] for part in body["messages"][1]["content"] if part["type"] == "text")
    assert "sum up" in texts and texts.rstrip().endswith("'Preference: 2'.")
    images = [part for part in body["messages"][1]["content"] if part["type"] == "image_url"]
    assert len(images) == 2 * len(queries[0].context_captions) + 2  # every example pair + the judged pair
    # the reply names both images in its reasoning; the last line decides: "2" in both orders = inconsistent
    assert result["dropped_share"] == 1.0
    with pytest.raises(ValueError, match="judge_base_url"):
        make_judge(smoke().with_overrides(["eval.judge=openai"]), None)


def test_judge_server_command_serves_the_interleaved_template(tmp_path):
    command = judge_server_command("/models/judge", 8011, tmp_path / "t.jinja", shots=4, dtype="float32")
    assert command[command.index("--chat-template") + 1] == str(tmp_path / "t.jinja")
    assert json.loads(command[command.index("--limit-mm-per-prompt") + 1]) == {"image": 10}
    assert command[command.index("--chat-template-content-format") + 1] == "openai"


def test_the_judge_template_keeps_images_where_the_message_puts_them():
    import jinja2

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Example 1. Image 1:"},
                {"type": "image"},
                {"type": "text", "text": "Image 2:"},
                {"type": "image_url", "image_url": {"url": "data:"}},
            ],
        }
    ]
    rendered = jinja2.Template(JUDGE_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>user\nExample 1. Image 1:\n<image>\nImage 2:\n<image>\n<|im_end|>\n<|im_start|>assistant\n"
    )
