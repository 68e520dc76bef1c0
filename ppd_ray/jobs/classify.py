"""Job: which user wrote these pairs? A linear classifier on frozen user embeddings, top-k accuracy vs chance.

    python -m ppd_ray.jobs.classify --embeddings /abs/embeddings/population --out /abs/classifier

The paper's Fig. 2 check of Stage 1 (`ppd.embed.classify`): the users with the most groups, some groups of every
user held out, top-k accuracy (k = 1..16) on them against chance k / users. Reads only the embeddings (no config,
no Ray cluster work); writes classifier.json and top_k.png. `ppd embed classify` runs this job.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ppd_ray.console import JobError
from ppd_ray.jobs.common import job_arg_parser, run_job

logger = logging.getLogger(__name__)

POOLINGS = ("auto", "flatten", "mean")


def run(
    embeddings: Path,
    out: Path,
    max_users: int = 300,
    test_per_user: int = 1,
    model_id: str | None = None,
    pooling: str = "auto",
    seed: int = 0,
):
    """Classify users from the embeddings in `embeddings`; writes out/classifier.json and out/top_k.png."""
    from ppd.embed.classify import evaluate_user_classifier, plot_top_k
    from ppd.embed.store import read_embeddings, read_rows

    if pooling not in POOLINGS:
        raise JobError(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    try:
        vectors = read_embeddings(embeddings, model_id=model_id)
        settings = {json.loads(s)["embedder"] for s in read_rows(embeddings)["settings"].to_pylist()}
    except (FileNotFoundError, ValueError) as err:
        raise JobError(str(err)) from None
    if pooling == "auto":  # pair-difference tokens are exchangeable: average them
        pooling = "mean" if settings == {"pairdiff"} else "flatten"
    logger.info(f"classifying users from {len(vectors)} embeddings ({pooling} pooling)")
    try:
        report = evaluate_user_classifier(
            vectors, pooling=pooling, max_users=max_users, test_per_user=test_per_user, seed=seed
        )
    except ValueError as err:
        raise JobError(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "classifier.json").write_text(report.to_json())
    plot_top_k(report, out / "top_k.png")
    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_arg_parser(__name__, prog, configured=False)
    parser.add_argument("--embeddings", required=True, type=Path, help="folder written by the embedding job")
    parser.add_argument("--out", "-o", required=True, type=Path, help="folder for classifier.json and top_k.png")
    parser.add_argument("--max-users", type=int, default=300, help="users with the most groups (paper: 300)")
    parser.add_argument("--test-per-user", type=int, default=1, help="held-out groups per user")
    parser.add_argument("--model-id", default=None, help="pick one model's embeddings in a mixed folder")
    parser.add_argument("--pooling", default="auto", help="auto | flatten | mean (auto: mean for pairdiff tokens)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")

    def job(args) -> str:
        report = run(
            args.embeddings, args.out, args.max_users, args.test_per_user, args.model_id, args.pooling, args.seed
        )
        return (
            f"{report.n_users} users, {report.train_groups} train / {report.test_groups} held-out groups\n"
            f"{report.summary()}\n-> {args.out}/classifier.json, {args.out}/top_k.png"
        )

    return run_job(parser, argv, job)


if __name__ == "__main__":
    sys.exit(main())
