"""How well does the judge (paper B.3) predict real choices? Held-out labelled pairs, judged from each user's 4 shots.

`judge_queries` turns held-out pairs of a prepared folder into judge queries: the context is the pair's condition
group (4 pairs of the same user that do not contain it, chosen by the preparation), the new pair is the held-out pair,
and the truth is the user's label. `make_judge` builds the configured backend (the toy world's oracle or an
OpenAI-compatible endpoint); `evaluate_judge` asks every query in both orders and returns the numbers that
`results.json["judge"]` and the report read.

A vLLM server can be the endpoint. LLaVA-OneVision's stock chat template puts every image of a message before its
text, which would detach "Example 1 ... Image 1:" from its images; `JUDGE_CHAT_TEMPLATE` renders the message parts in
order, one `<image>` placeholder where each image is. Serve with `judge_server_command` (or pass the written template
as `--chat-template FILE --chat-template-content-format openai` to `vllm serve`).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ppd.config import PPDConfig
from ppd.data.prepare import stable_unit
from ppd.embed.groups import groups_from_rows
from ppd.eval.evaluate import read_split
from ppd.eval.judge import JudgeQuery, Verdict, judge_pairs, openai_judge, oracle_judge
from ppd.eval.rewards import ToyRewards
from ppd.eval.stats import bootstrap_mean

Ask = Callable[[JudgeQuery, bool], Verdict]

# ChatML (Qwen2 / LLaVA-OneVision) with the parts of a message in their given order: text as written, an image as
# one `<image>` placeholder that vLLM expands. Content format "openai": the template sees the parts list.
JUDGE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] + '\\n' }}"
    "{% elif part['type'] in ['image', 'image_url'] %}{{ '<image>\\n' }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Judge:
    """A judge backend: its name in the results and the function that asks it one query in one order."""

    backend: str
    ask: Ask


def judge_queries(prepared: Path, split: str, count: int, seed: int) -> tuple[list[JudgeQuery], list[int]]:
    """Up to `count` held-out pairs of `split` as judge queries, and the user's choice of each (0 = image_a).

    Context = the pair's condition group (4 other pairs of the same user), skipping pairs whose caption occurs in
    that context. Pairs are spread over users: every user's first pair (seed-fixed order) before anyone's second.
    """
    prepared = Path(prepared)
    rows = read_split(prepared, split, ["pair_id", "user_id", "caption", "condition_group_id", "preferred"])
    rows = rows[rows["condition_group_id"].notna()]
    group_files = sorted((prepared / "groups").glob("*.parquet"))
    if rows.empty or not group_files:
        return [], []
    group_meta = pq.read_table(group_files, columns=["group_id", "user_id", "captions"]).to_pylist()
    context_of = {int(g["group_id"]): (int(g["user_id"]), set(g["captions"])) for g in group_meta}

    eligible: dict[int, list[int]] = {}  # user_id -> pair ids
    caption_of, group_of, truth_of = {}, {}, {}
    for pair_id, user_id, caption, group_id, preferred in rows.itertuples(index=False):
        group_user, group_captions = context_of[int(group_id)]
        if group_user != int(user_id):
            raise ValueError(
                f"{prepared}: pair {pair_id} of user {user_id} is conditioned on user {group_user}'s group"
            )
        if caption in group_captions:
            continue  # the judge would see the judged caption among the examples
        eligible.setdefault(int(user_id), []).append(int(pair_id))
        caption_of[int(pair_id)], group_of[int(pair_id)], truth_of[int(pair_id)] = (
            caption,
            int(group_id),
            int(preferred),
        )

    users = sorted(eligible, key=lambda u: stable_unit(seed, "judge-user", u))
    queues = {u: sorted(eligible[u], key=lambda p: stable_unit(seed, "judge-pair", p)) for u in users}
    chosen: list[int] = []
    for rank in range(max((len(q) for q in queues.values()), default=0)):
        chosen += [queues[u][rank] for u in users if rank < len(queues[u])]
    chosen = chosen[:count]
    if not chosen:
        return [], []

    # Images only for the chosen pairs and their context groups (a split can hold many thousand image pairs).
    images = pq.read_table(
        sorted((prepared / split).glob("*.parquet")),
        columns=["pair_id", "user_id", "jpg_0", "jpg_1"],
        filters=[("pair_id", "in", chosen)],
    ).to_pylist()
    pair_images = {int(r["pair_id"]): r for r in images}
    groups = groups_from_rows(
        pq.read_table(group_files, filters=[("group_id", "in", sorted({group_of[p] for p in chosen}))]).to_pylist()
    )
    group_by_id = {g.group_id: g for g in groups}

    queries, truth = [], []
    for pair_id in chosen:
        context, pair = group_by_id[group_of[pair_id]], pair_images[pair_id]
        queries.append(
            JudgeQuery(
                context_captions=context.captions,
                context_first=context.jpg_0,
                context_second=context.jpg_1,
                context_preferred=context.preferred,
                caption=caption_of[pair_id],
                image_a=pair["jpg_0"],
                image_b=pair["jpg_1"],
                user_id=int(pair["user_id"]),
            )
        )
        truth.append(truth_of[pair_id])
    return queries, truth


def toy_oracle_judge(rewards: ToyRewards) -> Ask:
    """The toy world's oracle for any user: the hidden reward of `query.user_id` decides."""

    def ask(query: JudgeQuery, swapped: bool) -> Verdict:
        if query.user_id is None:
            raise ValueError("the oracle judge needs JudgeQuery.user_id (whose hidden reward decides)")

        def reward(image: bytes) -> float:
            pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[None]  # [1, H, W, 3]
            return float(rewards.user_reward(query.user_id, pixels)[0])

        return oracle_judge(reward)(query, swapped)

    return ask


def make_judge(cfg: PPDConfig, world: Path | None) -> Judge:
    """The judge named by `cfg.eval.judge`: the oracle needs the toy world folder, "openai" the endpoint settings."""
    settings = cfg.eval
    if settings.judge == "oracle":
        if world is None:
            raise ValueError("eval.judge=oracle needs the toy world folder (its hidden rewards decide)")
        return Judge("oracle", toy_oracle_judge(ToyRewards(world)))
    if not settings.judge_base_url or not settings.judge_model:
        raise ValueError("eval.judge=openai needs eval.judge_base_url and eval.judge_model")
    api_key = os.environ.get(settings.judge_api_key_env) or None  # read when the judge is built, never at import
    ask = openai_judge(
        settings.judge_base_url,
        settings.judge_model,
        api_key,
        max_tokens=settings.judge_max_tokens,
        temperature=settings.judge_temperature,
        top_p=settings.judge_top_p,
        chain_of_thought=settings.judge_chain_of_thought,
        max_image_side=settings.judge_max_image_side,
    )
    return Judge(f"openai:{settings.judge_model}", ask)


def evaluate_judge(
    queries: Sequence[JudgeQuery],
    truth: Sequence[int],
    ask: Ask,
    backend: str,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict:
    """Ask every query in both orders; accuracy of the consistent verdicts against `truth` and the share dropped.

    Keys read by the report: backend, pairs, accuracy, dropped_share; also kept, dropped, accuracy_ci95 (bootstrap
    over users, whose pairs are not independent) and `preferred` (per query: 0 / 1 / None = dropped).
    """
    if len(queries) != len(truth):
        raise ValueError(f"{len(queries)} queries but {len(truth)} labels")
    report = judge_pairs(queries, ask)
    kept = [i for i, verdict in enumerate(report.preferred) if verdict is not None]
    correct = np.array([report.preferred[i] == truth[i] for i in kept], float)  # [kept]
    users = np.array([queries[i].user_id if queries[i].user_id is not None else -1 for i in kept])
    estimate = bootstrap_mean(correct, bootstrap_samples, seed, groups=users if len(kept) else None)
    return {
        "backend": backend,
        "pairs": len(queries),
        "accuracy": report.accuracy(truth),
        "accuracy_ci95": list(estimate.ci95),
        "dropped_share": report.dropped_share,
        "kept": len(kept),
        "dropped": report.dropped,
        "preferred": list(report.preferred),
    }


def write_judge_chat_template(path: Path) -> Path:
    """Write `JUDGE_CHAT_TEMPLATE` to `path` (for `--chat-template`)."""
    Path(path).write_text(JUDGE_CHAT_TEMPLATE)
    return Path(path)


def judge_server_command(
    model_dir: str,
    port: int,
    chat_template: Path,
    host: str = "127.0.0.1",
    shots: int = 4,
    max_model_len: int = 4096,
    dtype: str = "auto",
) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` serving a LLaVA-OneVision judge with the interleaved template.

    Room for `shots` context pairs + the judged pair (2 * shots + 2 images); eager mode (on CPU there is no graph
    capture to amortise; on GPUs drop it for speed). The served model name is `model_dir`.
    """
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--limit-mm-per-prompt",
        json.dumps({"image": 2 * shots + 2}),
        "--chat-template",
        str(chat_template),
        "--chat-template-content-format",
        "openai",
        "--enforce-eager",
        "--disable-log-stats",
    ]
