"""`ppd demo`: the whole system on the embedded default, every stage submitted as a Ray job to a local head.

toy world -> prepare (one-reward users, population) -> embed (one-hot users; pair-difference embedder) -> classify
-> precompute -> train (PPD, Diffusion-DPO, SFT, the per-reward DPO upper bounds, PPD on the population) ->
evaluate -> RESULTS.md + results.json. Starts a Ray head and an MLflow server on loopback and stops both.

Each stage is the documented entrypoint (`python -m ppd_ray.jobs.<job> ...`), submitted through the Jobs API exactly as
`ray job submit` would; the planned commands are printed so any stage can be rerun by hand.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ppd.config import PPDConfig
from ppd.eval.evaluate import POPULATION_VARIANT, upper_bound_variant
from ppd.eval.report import render_results_markdown, target_checks
from ppd.train.data import MANIFEST_FILE
from ppd_ray.console import JobError, progress_line

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # ppd_ray/pipelines/demo.py -> the repository
# The pretrained tiny Stage C every run starts from (regenerate: `ppd toy pretrain-base --out assets/toy_base`).
BASE_MODEL_DIR = REPO_ROOT / "assets" / "toy_base"
ONE_REWARD, POPULATION = "one_reward", "population"
# What was tried on missed targets and why (prose kept in the repo, appended to every generated RESULTS.md).
INVESTIGATION_NOTES = REPO_ROOT / "docs" / "results_investigation.md"
RESULTS_DIR = "results"  # one results file per seed: <out>/results/seed<S>.json
FIGURES_DIR = "results_figures"


@dataclass(frozen=True)
class DemoStage:
    """One job of the demo: a title for the progress log and the entrypoint submitted to Ray."""

    title: str
    argv: tuple[str, ...]
    output: Path | None  # a file the stage writes last: present = finished (`--resume` skips it); None = always run
    # May run beside its concurrent neighbours (`train.concurrent_runs` at once): independent training runs only.
    # Jobs with Ray Data actor pools stay alone: two pools can hold every CPU their own read tasks wait for.
    concurrent: bool = False

    @property
    def entrypoint(self) -> str:
        return shlex.join(self.argv)


@dataclass
class JobSequence:
    """Every job of one demo run, in order, with absolute paths (jobs run in an uploaded copy of the repo)."""

    workdir: Path
    preset: str
    overrides: list[str]
    stages: list[DemoStage] = field(default_factory=list)
    adapters: dict[str, str] = field(default_factory=dict)

    def add(
        self,
        title: str,
        output: Path | None,
        module: str,
        *args: str | Path,
        overrides: tuple[str, ...] = (),
        configured: bool = True,
        concurrent: bool = False,
    ) -> None:
        config: list[str] = ["--preset", self.preset] if configured else []
        for item in (*self.overrides, *overrides) if configured else ():
            config += ["--set", item]
        # Config options last: argparse jobs take them anywhere, `ppd_ray.cli.main` only after its subcommand.
        argv = ("python", "-m", module, *(str(a) for a in args), *config)
        self.stages.append(DemoStage(title, argv, output, concurrent))

    def train(self, title: str, precomputed: Path, variant: str, *overrides: str) -> None:
        run_dir = self.workdir / "runs" / variant
        self.add(
            title,
            run_dir / "summary.json",
            "ppd_ray.jobs.train",
            "--precomputed",
            precomputed,
            "--out",
            run_dir,
            overrides=overrides,
            concurrent=True,
        )
        self.adapters[variant] = str(run_dir / "adapter")

    def output_dirs(self) -> list[Path]:
        """Every folder a job of this sequence writes (its `--out`), in job order."""
        return [Path(stage.argv[stage.argv.index("--out") + 1]) for stage in self.stages if "--out" in stage.argv]


# Beside a stage's output: the command that wrote it. A stage is kept (`--resume`, the β sweep's runs) only when its
# output was written by the very command it would run now; an output of other settings is cleared and rerun.
STAGE_RECORD_SUFFIX = ".command.json"
# Settings that do not change what a job computes: where its MLflow run is logged (a sweep's parent run is new on
# every invocation, and a kept run is moved under it).
UNRECORDED_SETTINGS = ("tracking.",)


def stage_command(stage: DemoStage) -> list[str]:
    """The stage's command as recorded beside its output: everything but `--set` items of UNRECORDED_SETTINGS."""
    argv, command = list(stage.argv), []
    index = 0
    while index < len(argv):
        if argv[index] == "--set" and index + 1 < len(argv) and argv[index + 1].startswith(UNRECORDED_SETTINGS):
            index += 2
            continue
        command.append(argv[index])
        index += 1
    return command


def _record_path(output: Path) -> Path:
    return output.with_name(output.name + STAGE_RECORD_SUFFIX)


def record_finished(stage: DemoStage) -> None:
    """After the stage's job succeeded: record the command that wrote its output (what `keep_or_clear` checks)."""
    if stage.output is not None and stage.output.is_file():
        _record_path(stage.output).write_text(json.dumps({"command": stage_command(stage)}, indent=1) + "\n")


def keep_or_clear(stage: DemoStage) -> bool:
    """True when the stage finished earlier with this same command (its output can be kept). An output written with
    other settings, or without a record of them, is removed with the stage's `--out` folder (a training job refuses
    a folder holding another config's run; an embedding job would keep its rows); returns False then, and when there
    is no output."""
    if stage.output is None or not stage.output.is_file():
        return False
    record = _record_path(stage.output)
    if record.is_file() and json.loads(record.read_text()).get("command") == stage_command(stage):
        return True
    why = "other settings" if record.is_file() else "settings not recorded (an older run)"
    target = Path(stage.argv[stage.argv.index("--out") + 1]) if "--out" in stage.argv else stage.output
    logger.info(f"== {stage.title}: {stage.output} was written with {why}: removing {target}, running it again")
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    return False


def machine_facts(seconds: float = 1.0) -> dict:
    """What the demo's runtime depends on, measured on this box before any job starts: CPU model, logical CPUs, the
    widest vector unit, and one core's float32 matrix-multiply speed (GFLOP/s, 256 x 256 products for ~`seconds`).
    Runtimes of two boxes compare only through these: the same demo's training took ~2x longer on one 2-core box
    than on another, both sold as 2 cores."""
    import os

    import torch

    model, flags = "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    units = {"avx512f": "AVX-512", "avx2": "AVX2", "avx": "AVX"}
    vector = next((label for flag, label in units.items() if flag in flags), "SSE" if flags else "unknown")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        torch.mm(a, b)  # warm-up
        products, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            torch.mm(a, b)
            products += 1
        gflops = products * 2 * 256**3 / (time.perf_counter() - began) / 1e9
    finally:
        torch.set_num_threads(threads)
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "vector_unit": vector,
        "gflops_one_core": round(gflops, 1),
    }


def one_reward_user_ids(world: Path) -> dict[str, int]:
    """Reward attribute -> the id of the synthetic user who holds only that reward."""
    return {k: int(v) for k, v in json.loads((world / "manifest.json").read_text())["one_reward_users"].items()}


TIMINGS_FILE = "timings.json"  # seconds per finished stage (a resumed run adds the kept stages' time)
BETA_CHOICE = "beta_sweep.json"  # <out>/results/beta_sweep.json, written by `ppd sweep beta`


def read_beta_sweep(out_dir: Path) -> dict | None:
    """The record `ppd sweep beta` wrote into `out_dir` (validation scores per method and β, the choice); None if none."""
    path = out_dir / RESULTS_DIR / BETA_CHOICE
    return json.loads(path.read_text()) if path.is_file() else None


def read_beta_choice(out_dir: Path, preset: str) -> dict[str, float] | None:
    """The β per method that `ppd sweep beta` chose on the validation split for this preset; None if there is none."""
    record = read_beta_sweep(out_dir)
    if record is None or record.get("preset") != preset:
        return None
    return {k: float(v) for k, v in record["chosen"].items()}


def demo_jobs(
    cfg: PPDConfig, workdir: Path, overrides: list[str], seed: int, world: Path, betas: dict[str, float] | None = None
) -> JobSequence:
    """The jobs of one demo run after the toy world exists (its manifest names the one-reward users).

    `betas` ({"ppd": β, "dpo": β}, chosen on validation by `ppd sweep beta`) sets train.beta of the PPD and
    Diffusion-DPO runs; None keeps the preset's."""
    beta = {m: (f"train.beta={betas[m]:g}",) if betas and m in betas else () for m in ("ppd", "dpo")}
    w = workdir.resolve()
    prepared, embeddings, precomputed = w / "prepared", w / "embeddings", w / "precomputed"
    jobs = JobSequence(w, cfg.preset, [*overrides, f"data.seed={seed}", f"train.seed={seed}"])
    base = f"model.stage_c_path={BASE_MODEL_DIR}"
    # Sec. 5.1 analogue: every one-reward user is trained on, so none is held out as unseen.
    jobs.add(
        "prepare one-reward users",
        prepared / ONE_REWARD / "accounting.json",
        "ppd_ray.jobs.prepare",
        "--input",
        world / "pairs" / ONE_REWARD,
        "--out",
        prepared / ONE_REWARD,
        overrides=("data.test_unseen_user_fraction=0",),
    )
    jobs.add(
        "prepare population",
        prepared / POPULATION / "accounting.json",
        "ppd_ray.jobs.prepare",
        "--input",
        world / "pairs" / POPULATION,
        "--out",
        prepared / POPULATION,
    )
    # Sec. 5.1 conditions on one-hot user ids; the population on pair-difference embeddings of 4-shot groups.
    for population, embedder in ((ONE_REWARD, "onehot"), (POPULATION, "pairdiff")):
        jobs.add(
            f"embed {population} ({embedder})",
            None,  # the embedding job resumes by itself (embeds only groups not yet in its output)
            "ppd_ray.jobs.embed",
            "--prepared",
            prepared / population,
            "--out",
            embeddings / population,
            "--embedder",
            embedder,
        )
    jobs.add(
        "classify population users from their embeddings",
        w / "classifier" / "classifier.json",
        "ppd_ray.jobs.classify",
        "--embeddings",
        embeddings / POPULATION,
        "--out",
        w / "classifier",
        "--seed",
        str(seed),
        configured=False,  # works on the embeddings alone: no config options
    )
    for population in (ONE_REWARD, POPULATION):
        jobs.add(
            f"precompute {population}",
            precomputed / population / MANIFEST_FILE,
            "ppd_ray.jobs.precompute",
            "--prepared",
            prepared / population,
            "--embeddings",
            embeddings / population,
            "--out",
            precomputed / population,
            overrides=(base,),
        )
    one_reward_inputs = precomputed / ONE_REWARD
    # The training runs are independent: they run `train.concurrent_runs` at a time, longest first, so that the short
    # upper bounds fill the gaps at the end instead of one long run ending alone.
    ppd, dpo = ("train.method=ppd", *beta["ppd"]), ("train.method=dpo", *beta["dpo"])
    jobs.train("train PPD on the one-reward users", one_reward_inputs, "ppd", base, *ppd)
    jobs.train("train Diffusion-DPO (no user) on the one-reward users", one_reward_inputs, "dpo", base, *dpo)
    jobs.train("train PPD on the population", precomputed / POPULATION, POPULATION_VARIANT, base, *ppd)
    jobs.train(
        "train SFT on preferred images on the one-reward users", one_reward_inputs, "sft", base, "train.method=sft"
    )
    for attribute, user_id in one_reward_user_ids(world).items():
        if cfg.train.upper_bound_rewards is not None and attribute not in cfg.train.upper_bound_rewards:
            continue
        jobs.train(
            f"train the DPO upper bound for {attribute} (user {user_id} only)",
            one_reward_inputs,
            upper_bound_variant(attribute),
            base,
            *dpo,
            f"train.users=[{user_id}]",
            f"train.max_steps={cfg.train.upper_bound_steps}",
        )
    jobs.add(
        "evaluate every model on the hidden rewards",
        w / "eval" / "results.json",
        "ppd_ray.jobs.evaluate",
        "--world",
        world,
        "--one-reward-prepared",
        prepared / ONE_REWARD,
        "--population-prepared",
        prepared / POPULATION,
        "--population-embeddings",
        embeddings / POPULATION,
        "--adapters",
        w / "adapters.json",
        "--classifier",
        w / "classifier" / "classifier.json",
        "--out",
        w / "eval",
        "--seed",
        str(seed),
        overrides=(base,),
    )
    return jobs


def clear_earlier_outputs(jobs: JobSequence) -> list[Path]:
    """A fresh run starts from nothing an earlier run in the same workdir left: jobs would otherwise find its outputs
    (a training job refuses a folder holding another config's checkpoints; the embedding job would keep its rows).
    The MLflow store stays: earlier runs remain there to compare with. Returns what was removed."""
    stale = [path for path in (*jobs.output_dirs(), jobs.workdir / TIMINGS_FILE) if path.exists()]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if stale:
        logger.info(
            f"fresh run: removed {len(stale)} output(s) of an earlier run in {jobs.workdir} (MLflow runs kept; "
            "`--resume` keeps finished stages instead)"
        )
    return stale


def write_results(results: dict, out_dir: Path, command: str) -> tuple[Path, Path]:
    """results/seed<S>.json, then RESULTS.md from every seed's file in `out_dir` (seeds side by side); the figures are
    copied beside them (results_figures/seed<S>/) so the Markdown links resolve."""
    seed = int(results["seed"])
    figures_dir = out_dir / FIGURES_DIR / f"seed{seed}"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, path in results.get("figures", {}).items():
        target = figures_dir / Path(path).name
        shutil.copyfile(path, target)
        figures[name] = str(target.relative_to(out_dir))
    results = {**results, "figures": figures}
    json_path = out_dir / RESULTS_DIR / f"seed{seed}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    return json_path, rerender_results(out_dir, command)


def rerender_results(out_dir: Path, command: str) -> Path:
    """Rewrite RESULTS.md from the results/seed<S>.json files in `out_dir` (same numbers; picks up report changes)."""
    paths = sorted((out_dir / RESULTS_DIR).glob("seed*.json"))
    if not paths:
        raise JobError(f"no {out_dir / RESULTS_DIR}/seed<S>.json: run `ppd demo` first")
    runs = [json.loads(path.read_text()) for path in paths]
    investigation = INVESTIGATION_NOTES.read_text() if INVESTIGATION_NOTES.is_file() else None
    md_path = out_dir / "RESULTS.md"
    md_path.write_text(render_results_markdown(runs, command, investigation, read_beta_sweep(out_dir)))
    return md_path


def run_demo(
    cfg: PPDConfig,
    workdir: Path,
    out_dir: Path,
    overrides: list[str],
    seed: int,
    command: str,
    generate_world: Callable[[PPDConfig, Path, int], object],
    resume: bool = False,
) -> dict:
    """Run every stage as a Ray job on a local head; returns the results also written to out_dir/results.json.

    `resume` keeps what an earlier run with the same workdir finished (the toy world, every stage whose output was
    written by the same command) and runs only the rest; the toy world is the caller's promise that preset and seed
    are unchanged (it is not rebuilt)."""
    from ppd_ray.infra.local_cluster import local_head
    from ppd_ray.infra.mlflow_server import tracking_uri

    machine = machine_facts()  # first: the box is still idle
    logger.info(f"machine: {machine}")
    began = time.monotonic()
    if not (BASE_MODEL_DIR / "prior" / "config.json").is_file():
        raise JobError(f"{BASE_MODEL_DIR} is missing: run `ppd toy pretrain-base --out {BASE_MODEL_DIR}`")
    workdir = workdir.resolve()
    world = workdir / "toy"
    world_ready: Future | None = None
    # The toy world is drawn on one core while the MLflow server and the Ray head start beside it (they were ~13 s
    # of an otherwise idle second core).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="toy-world") as world_pool, ExitStack() as services:
        if resume and (world / "manifest.json").is_file():
            logger.info(f"== toy world: kept {world} (--resume)")
        else:
            logger.info(f"== toy world ({cfg.preset}, seed {seed}) -> {world}")
            world_ready = world_pool.submit(generate_world, cfg, world, seed)
        uri = services.enter_context(tracking_uri(cfg.tracking.uri, workdir / "mlflow"))
        cluster = services.enter_context(local_head())
        if world_ready is not None:
            world_ready.result()
        betas = read_beta_choice(out_dir, cfg.preset)
        logger.info(
            f"β from {out_dir / RESULTS_DIR / BETA_CHOICE} (chosen on validation): {betas}"
            if betas
            else f"β of the preset ({cfg.train.beta:g}): no `ppd sweep beta` choice for preset {cfg.preset} in {out_dir}"
        )
        jobs = demo_jobs(cfg, workdir, overrides, seed, world, betas)
        if not resume:
            clear_earlier_outputs(jobs)
        (workdir / "adapters.json").write_text(json.dumps(jobs.adapters, indent=1) + "\n")
        (workdir / "jobs.sh").write_text(
            "# The demo's jobs; each line can be run with `ray job submit --address ... --working-dir . -- <line>`\n"
            + "\n".join(stage.entrypoint for stage in jobs.stages)
            + "\n"
        )
        logger.info(f"{len(jobs.stages)} jobs planned (commands in {workdir / 'jobs.sh'})")
        # Seconds per finished stage, so that a resumed run still reports the whole run's time (an upper bound when
        # the kept stages had run side by side: their seconds add up, their wall time overlapped).
        timings_path = workdir / TIMINGS_FILE
        timings: dict[str, float] = json.loads(timings_path.read_text()) if resume and timings_path.is_file() else {}
        kept_seconds = 0.0
        total = len(jobs.stages)
        timings_lock = threading.Lock()

        def run_stage(index: int, stage: DemoStage, cluster, env: dict[str, str]) -> None:
            started = time.monotonic()
            logger.info(f"== [{index}/{total}] {stage.title}")
            outcome = cluster.submit_and_wait(
                stage.entrypoint, working_dir=REPO_ROOT, env_vars=env, on_log=partial(job_line, index=index)
            )
            with timings_lock:
                timings[stage.title] = round(time.monotonic() - started, 1)
                timings_path.write_text(json.dumps(timings, indent=1) + "\n")
            record_finished(stage)
            logger.info(f"   [{index}/{total}] done in {timings[stage.title]:.0f}s ({outcome.job_id})")

        env = {"MLFLOW_TRACKING_URI": uri}
        pending: list[tuple[int, DemoStage]] = []
        for index, stage in enumerate(jobs.stages, 1):
            if resume and keep_or_clear(stage):
                logger.info(f"== [{index}/{total}] {stage.title}: done earlier with the same command, kept (--resume)")
                kept_seconds += timings.get(stage.title, 0.0)
                continue
            pending.append((index, stage))
        for wave in _waves(pending):
            if len(wave) == 1:
                run_stage(*wave[0], cluster, env)
            else:
                run_concurrently(wave, cfg.train.concurrent_runs, lambda item: run_stage(*item, cluster, env))
        logger.info(f"MLflow: runs in {workdir / 'mlflow'} (browse with `mlflow ui --backend-store-uri sqlite:///...`)")
    results = json.loads((workdir / "eval" / "results.json").read_text())
    top_k_plot = workdir / "classifier" / "top_k.png"  # Fig. 2 analogue, drawn by the classify stage
    if top_k_plot.is_file():
        results.setdefault("figures", {})["top-k user classification"] = str(top_k_plot)
    runtime = round(time.monotonic() - began + kept_seconds, 1)
    results.update({"preset": cfg.preset, "seed": seed, "runtime_s": runtime, "resumed": bool(kept_seconds)})
    results["machine"] = machine
    results["beta"] = {"ppd": cfg.train.beta, "dpo": cfg.train.beta, **(betas or {})}
    results["beta_source"] = "ppd sweep beta (validation split)" if betas else "preset"
    write_results(results, out_dir, command)
    return results


def _waves(stages: list[tuple[int, DemoStage]]) -> list[list[tuple[int, DemoStage]]]:
    """Consecutive concurrent stages form one wave; every other stage is a wave of its own (runs alone, in order)."""
    waves: list[list[tuple[int, DemoStage]]] = []
    for item in stages:
        if waves and item[1].concurrent and waves[-1][-1][1].concurrent:
            waves[-1].append(item)
        else:
            waves.append([item])
    return waves


def run_concurrently(items: list, at_once: int, run: Callable[[object], None]) -> None:
    """`run(item)` for every item, `at_once` at a time, in order of submission. The first failure stops what has not
    started and is raised at once (the caller then stops the cluster, which ends the jobs still running)."""
    failed = threading.Event()

    def guarded(item) -> None:
        if failed.is_set():  # set by a failing item before its thread can take the next one
            return
        try:
            run(item)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max_workers=max(1, at_once), thread_name_prefix="demo-job")
    futures = [pool.submit(guarded, item) for item in items]
    try:
        for future in as_completed(futures):
            future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def job_line(line: str, index: int | None = None) -> None:
    """Forward a job's own progress lines (and errors) to the terminal, not Ray's per-task chatter; `index` names the
    stage (jobs running side by side interleave their lines)."""
    text = progress_line(line)
    if text is not None:
        print(f"   {'' if index is None else f'[{index}] '}| {text}", flush=True)


def summary_table(results: dict) -> str:
    """Every target of this run as a plain-text table for the terminal (the same checks as RESULTS.md)."""
    rows = [("target", "value", "goal", "")]
    rows += [(c.name, c.value, c.target, "met" if c.met else "MISSED") for c in target_checks(results)]
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)
