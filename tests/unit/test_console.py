"""Which lines of a job's log reach the terminal of `ppd demo` / `ppd sweep beta`, and how they read there."""

from __future__ import annotations

from ppd_ray.console import progress_line


def test_our_progress_lines_show_also_when_a_ray_worker_prints_them():
    # As Ray 2.60 forwards a Train worker's and a Ray Data actor's stderr into the job's log (colour codes included).
    worker = "\x1b[36m(RayTrainWorker pid=3765)\x1b[0m [ppd   116.9s] step 80/400 loss 0.6717 acc 0.69 32 pairs/s"
    assert progress_line(worker) == "[ppd   116.9s] step 80/400 loss 0.6717 acc 0.69 32 pairs/s"
    actor = "(MapWorker(MapBatches(Generator)) pid=12, ip=10.0.0.2) [ppd     3.0s] generator ready"
    assert progress_line(actor) == "[ppd     3.0s] generator ready"
    assert progress_line("[ppd    24.8s] submitted job raysubmit_x") == "[ppd    24.8s] submitted job raysubmit_x"


def test_errors_show_and_ray_chatter_does_not():
    assert progress_line("\x1b[36m(RayTrainWorker pid=1)\x1b[0m RuntimeError: boom") == "RuntimeError: boom"
    assert progress_line("2026-11-29 17:17:13,977\tINFO packaging.py:385 -- Ignoring upload to cluster") is None
    assert progress_line("\x1b[36m(RayTrainWorker pid=1)\x1b[0m Setting up process group for: env://") is None
    assert progress_line("(pid=7) Running 0: 0.00 row [00:00, ? row/s]") is None


def test_lines_that_only_mention_error_stay_hidden():
    # Both printed by `ppd demo` on 2026-12-08 (trimmed): the GCS logging its own shutdown of a job's actors, and
    # Ray Train echoing a report whose metrics carry our denoising errors.
    gcs = (
        "\x1b[36m(pid=gcs_server)\x1b[0m [2026-12-07 23:56:36,265 E 30064 30064] (gcs_server) gcs_actor_scheduler.cc:538:"
        " Failed to kill actor NIL_ID, return status: Invalid: KillActor RPC failed for actor NIL_ID: RpcError: RPC error"
    )
    assert progress_line(gcs) is None
    echo = (
        "\x1b[36m(RayTrainWorker pid=5)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=Checkpoint("
        "filesystem=local, path=/w/runs/ppd/ray/train/step-00000200), metrics={'model_error_lose': 0.0097})"
    )
    assert progress_line(echo) is None
    # a worker's real error still shows
    assert progress_line("\x1b[36m(RayTrainWorker pid=5)\x1b[0m ValueError: bad shard") == "ValueError: bad shard"
