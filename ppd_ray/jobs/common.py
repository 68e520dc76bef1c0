"""What every job entry point shares: config from arguments, Ray start-up, the generation actor pool."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ppd.config import PRESETS, ConfigError, PPDConfig, load_config
from ppd.errors import InputDataError
from ppd_ray.console import JobError, setup_logging

logger = logging.getLogger(__name__)


def job_arg_parser(module: str, prog: str | None = None, configured: bool = True) -> argparse.ArgumentParser:
    """The job's own argument parser (`ppd <job>` runs it too, as `prog`), described by the job's docstring; with
    `configured`, the options every job takes: a preset or a config file, plus dotted overrides."""
    doc = (sys.modules[module].__doc__ or "").strip()
    summary, _, details = doc.partition("\n")
    parser = argparse.ArgumentParser(
        prog=prog or f"python -m {module}",
        description=summary,
        epilog=details.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if configured:
        parser.add_argument("--preset", "-p", default="tiny_cpu", help=f"named config preset ({', '.join(PRESETS)})")
        parser.add_argument("--config", default=None, help="a YAML/JSON config file (instead of --preset)")
        parser.add_argument(
            "--set",
            "-s",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.FIELD=VALUE",
            help="override a config field, e.g. --set train.lr=1e-4 (repeatable)",
        )
    return parser


def config_from_args(args: argparse.Namespace, *extra_overrides: str) -> PPDConfig:
    """The validated config named by --preset/--config and --set (then `extra_overrides`, from a job's shortcut
    flags); a ConfigError becomes a JobError."""
    try:
        return load_config(args.preset, [*args.overrides, *extra_overrides], args.config)
    except (ConfigError, OSError) as err:
        raise JobError(str(err)) from None


def read_json_file(path: Path | None, what: str) -> dict:
    """A JSON file a flag names ({} when the flag was not given); unreadable is a JobError naming the flag."""
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise JobError(f"cannot read {what} {path}: {err}") from None


def run_job(parser: argparse.ArgumentParser, argv: list[str] | None, job: Callable[[argparse.Namespace], str]) -> int:
    """A job's `main`: parse `argv`, set up the progress lines, run `job(args)` and print what it returns; a JobError
    (or the library's InputDataError) is one line on stderr and its exit status (2)."""
    args = parser.parse_args(argv)
    setup_logging()
    try:
        print(job(args))
    except (JobError, InputDataError) as err:  # InputDataError: the library's word for a user's mistake
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", JobError.exit_code)
    return 0


def init_ray() -> None:
    """Connect to the cluster this job was submitted to (RAY_ADDRESS), or start a local Ray."""
    from ppd_ray.infra.ray_auth import start_or_connect

    if os.environ.get("RAY_ADDRESS"):  # submitted with `ray job submit`, or pointed at a running head
        start_or_connect(logging_level="WARNING")
    else:
        # A job run on its own starts a local Ray for itself, without the dashboard (seconds of start-up saved).
        start_or_connect(
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"worker_process_setup_hook": f"{__name__}.{quiet_train_cleaner.__name__}"},
        )
    quiet_ray_data_console()


# Ray Train's detached placement-group cleaner asks the state API, which lives in the dashboard, every second whether
# the train controller still runs, and warns on every failed ask: without a dashboard, once a second for the whole
# run. Its one duty (removing the placement group of a controller that died) is moot on a Ray that ends with the job.
_TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_train_cleaner() -> None:
    """Worker-process setup hook of a job's own local Ray: the cleaner's warnings off (errors still show)."""
    logging.getLogger(_TRAIN_CLEANER_LOGGER).setLevel(logging.ERROR)


def quiet_ray_data_console() -> None:
    """Keep Ray Data's per-dataset INFO chatter in its log files, off the console: our own log lines show progress."""
    import ray.data

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    # Ray Data's bars redraw in place: useful in a terminal, noise in logs.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def generate_images(cfg: PPDConfig, requests: list[dict], adapters: dict[str, str]):
    """Requests (variant, caption, seed, request_id, embedding...) -> the same rows with their PNG and image rewards,
    generated on a Ray Data actor pool (`GenerationStage`: each actor loads each variant once; a GPU per actor when
    `eval.gpus_per_actor` gives one). The evaluate and validate jobs share it."""
    import pandas as pd
    import ray

    from ppd.eval.generate import GenerationStage, check_user_embeddings, distinct_images

    check_user_embeddings(requests, adapters)
    init_ray()
    actors = cfg.eval.concurrency
    if not cfg.eval.gpus_per_actor:
        # A CPU actor takes one CPU: more actors than the cluster has CPUs would wait for ever for the rest.
        cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        if actors > cpus:
            logger.info(f"eval.concurrency={actors}: this cluster has {cpus} CPU(s), generating on {cpus} actor(s)")
            actors = cpus
    distinct, sources = distinct_images(requests)
    if len(distinct) < len(requests):
        logger.info(f"{len(requests)} images requested, {len(distinct)} distinct: each drawn once")
    generated = (
        ray.data.from_items(distinct)
        .map_batches(
            GenerationStage,
            batch_size=cfg.eval.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=cfg.eval.gpus_per_actor or None,
            fn_constructor_kwargs={"config": cfg.to_dict(), "adapters": adapters},
        )
        .to_pandas()
    )
    # Every request gets the image (and image rewards) of the distinct request that drew it.
    frame = pd.DataFrame(requests).assign(_drawn_by=sources)
    generated = generated.rename(columns={"request_id": "_drawn_by"})
    frame = frame.merge(generated, on="_drawn_by").drop(columns="_drawn_by")
    return frame.sort_values("request_id").reset_index(drop=True)
