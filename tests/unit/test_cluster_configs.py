"""cluster/: every manifest parses, names real job modules and presets, shares one runtime env, and adds up."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from ppd.config import PRESETS, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
JOBS = ("prepare", "embed", "precompute", "train", "evaluate")
TRAINING_PRESETS = ("stage_c_lite_h100x8", "stage_c_h100x8", "stage_c_lite_h100x16", "stage_c_h100x16")
# The cluster of cluster/ is 2 nodes x 8 H100: the presets its jobs name.
CLUSTER_TRAINING_PRESETS = ("stage_c_lite_h100x16", "stage_c_h100x16")
SHARED_MOUNT = "/mnt/shared"


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str) -> dict:
    found = [doc for doc in _documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}"
    return found[0]


def _runtime_env() -> dict:
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


def _gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    service = _one(CLUSTER / "rayservice.yaml", "RayService")
    return [
        ("raycluster.yaml", _one(CLUSTER / "raycluster.yaml", "RayCluster")["spec"]),
        ("rayservice.yaml", service["spec"]["rayClusterConfig"]),
    ]


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def _job(name: str) -> dict:
    return _one(CLUSTER / "jobs" / f"{name}.yaml", "RayJob")


def test_every_yaml_parses_and_every_kubernetes_object_is_namespaced() -> None:
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        for doc in _documents(path):
            assert isinstance(doc, dict), path
            if "apiVersion" in doc and doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "ppd", f"{path.name}: {doc['kind']} outside namespace ppd"


def test_one_runtime_env_everywhere() -> None:
    runtime_env = _runtime_env()
    assert set(runtime_env) == {"env_vars"}  # code and dependencies come from the image
    for name in JOBS:
        assert yaml.safe_load(_job(name)["spec"]["runtimeEnvYAML"]) == runtime_env, f"jobs/{name}.yaml"
    serve_config = yaml.safe_load(_one(CLUSTER / "rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    for application in serve_config["applications"]:
        assert application["runtime_env"] == runtime_env, f"rayservice.yaml application {application['name']}"
    launcher = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    assert "runtime_env" not in yaml.safe_dump(launcher)  # ray up clusters get it at `ray job submit --runtime-env`


class _Parsed(Exception):
    """Raised by the patched config loader once a job's arguments are parsed (nothing runs)."""


@pytest.mark.parametrize("name", JOBS)
def test_job_entrypoints_name_real_modules_arguments_and_presets(name: str, monkeypatch) -> None:
    job = _job(name)
    assert job["spec"]["clusterSelector"] == {
        "ray.io/cluster": _one(CLUSTER / "raycluster.yaml", "RayCluster")["metadata"]["name"]
    }
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", f"ppd_ray.jobs.{name}"], argv
    module = importlib.import_module(f"ppd_ray.jobs.{name}")
    real_config_from_args = module.config_from_args
    parsed = {}

    def parse_only(args):
        parsed["args"], parsed["config"] = args, real_config_from_args(args)  # an unknown preset fails here
        raise _Parsed

    monkeypatch.setattr(module, "config_from_args", parse_only)
    if name == "evaluate":
        monkeypatch.setattr(module, "read_json_file", lambda path, what: {})  # the adapters file exists on the cluster
    with pytest.raises(_Parsed):
        module.main(argv[3:])  # argparse exits (SystemExit) on an unknown or missing argument
    args = parsed["args"]
    assert args.preset in PRESETS and parsed["config"].preset == args.preset
    paths = [str(value) for key, value in vars(args).items() if isinstance(value, Path)]
    assert paths and all(path.startswith(SHARED_MOUNT + "/") for path in paths), paths


def test_each_job_reads_what_the_previous_job_writes() -> None:
    outputs = {}
    for name in JOBS:
        argv = shlex.split(_job(name)["spec"]["entrypoint"])
        flags = dict(zip(argv[3::2], argv[4::2], strict=False))
        outputs[name] = flags
    assert outputs["embed"]["--prepared"] == outputs["prepare"]["--out"]
    assert outputs["precompute"]["--prepared"] == outputs["prepare"]["--out"]
    assert outputs["precompute"]["--embeddings"] == outputs["embed"]["--out"]
    assert outputs["train"]["--precomputed"] == outputs["precompute"]["--out"]
    assert outputs["evaluate"]["--prepared"] == outputs["prepare"]["--out"]
    assert outputs["evaluate"]["--embeddings"] == outputs["embed"]["--out"]
    assert outputs["evaluate"]["--adapter"] == f"ppd={outputs['train']['--out']}/adapter"
    assert "--world" not in outputs["evaluate"]  # real data: no hidden reward is read
    serve_cfg = load_config("serve_lite_h100")
    assert (
        serve_cfg.serve.adapter_dir == f"{outputs['train']['--out']}/adapter"
    )  # ppd_ray.jobs.train writes OUT/adapter
    assert serve_cfg.serve.example_pairs_dir == f"{outputs['prepare']['--out']}/validation"  # the page's examples


@pytest.mark.parametrize("preset", TRAINING_PRESETS)
def test_training_resources_add_up_to_the_effective_batch(preset: str) -> None:
    train = load_config(preset).train
    assert train.use_gpu and train.precision == "bf16" and train.zero_stage == 2
    # workers x GPUs per worker x micro-batch x accumulation = effective batch (768 pairs, paper).
    assert train.num_workers * 1 * train.micro_batch * train.grad_accumulation == train.effective_batch == 768
    # one training worker per GPU the preset's name promises (whether the micro-batch fits a GPU: `ppd check-real`)
    assert train.num_workers == (16 if preset.endswith("x16") else 8)


@pytest.mark.parametrize("preset", CLUSTER_TRAINING_PRESETS)
def test_the_cluster_has_a_gpu_per_training_worker_and_whole_nodes(preset: str) -> None:
    train = load_config(preset).train
    for name in ("precompute", "train", "evaluate"):
        assert shlex.split(_job(name)["spec"]["entrypoint"])[4] in CLUSTER_TRAINING_PRESETS, name
    workers = _one(CLUSTER / "raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]
    for group in workers:  # one pod per 8-GPU machine: NVLink inside a pod, the RDMA fabric between pods
        container = group["template"]["spec"]["containers"][0]
        assert _gpus(container) == 8
        assert int(container["resources"]["limits"]["vpc.amazonaws.com/efa"]) > 0
        env = {item["name"] for item in container["env"]}
        assert {"FI_PROVIDER", "NCCL_SOCKET_IFNAME"} <= env
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    kuberay_gpus = sum(group["maxReplicas"] * _gpus(group["template"]["spec"]["containers"][0]) for group in workers)
    assert kuberay_gpus == train.num_workers
    assert all(group["minReplicas"] == group["replicas"] == group["maxReplicas"] for group in workers)
    launcher = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    launcher_gpus = sum(
        node["max_workers"] * node["resources"].get("GPU", 0)
        for node in launcher["available_node_types"].values()
        if "max_workers" in node
    )
    assert launcher_gpus == train.num_workers


def test_embedding_job_fits_the_cluster() -> None:
    preset = shlex.split(_job("embed")["spec"]["entrypoint"])[4]
    embed = load_config(preset).embed
    assert embed.embedder == "vlm-vllm" and "llava-onevision" in (embed.vlm_path or "")
    assert embed.dtype == "bfloat16" and embed.layers == "all"
    workers = _one(CLUSTER / "raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]
    gpus = sum(group["replicas"] * _gpus(group["template"]["spec"]["containers"][0]) for group in workers)
    assert embed.concurrency * embed.gpus_per_actor == gpus  # one actor per GPU of the cluster: none idle, none short


def test_rayservice_has_gpus_for_every_replica_of_its_preset() -> None:
    serve_config = yaml.safe_load(_one(CLUSTER / "rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    cfg = load_config(application["args"]["preset"], application["args"].get("overrides", []))
    serve = cfg.serve

    def gpus_needed(bound: str) -> float:
        total = 0.0
        for spec in (serve.ingress, serve.embedder, serve.generator):
            replicas = spec.replicas if spec.autoscaling is None else getattr(spec.autoscaling, f"{bound}_replicas")
            total += replicas * spec.gpus
        return total

    workers = _one(CLUSTER / "rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    per_pod = [_gpus(group["template"]["spec"]["containers"][0]) for group in workers]
    assert sum(g["minReplicas"] * n for g, n in zip(workers, per_pod, strict=True)) >= gpus_needed("min")
    assert sum(g["maxReplicas"] * n for g, n in zip(workers, per_pod, strict=True)) >= gpus_needed("max")


def test_rayservice_mirrors_the_serve_config() -> None:
    serve_config = yaml.safe_load(_one(CLUSTER / "rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    local = REPO_ROOT / "ppd_ray" / "serving" / "config.yaml"
    if local.exists():
        reference = yaml.safe_load(local.read_text())
        assert set(serve_config) == set(reference)
        assert serve_config["http_options"]["port"] == reference["http_options"]["port"]
        for ours, theirs in zip(serve_config["applications"], reference["applications"], strict=True):
            for key in ("name", "route_prefix", "import_path"):
                assert ours[key] == theirs[key], key
            assert set(ours["args"]) <= set(theirs["args"]) | {"overrides", "config_file"}
            assert [d["name"] for d in ours.get("deployments", [])] == [
                d["name"] for d in theirs.get("deployments", [])
            ]
    for application in serve_config["applications"]:
        module, _, attribute = application["import_path"].partition(":")
        assert module == "ppd_ray.serving.app" and attribute == "build_app"
        assert importlib.util.find_spec(module) is not None
        assert application["args"]["preset"] in PRESETS


def test_jobs_find_mlflow_at_the_service_of_the_manifest() -> None:
    documents = _documents(CLUSTER / "mlflow.yaml")
    service = next(d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    port = service["spec"]["ports"][0]["port"]
    for preset in (*TRAINING_PRESETS, "llava_ov7b_vllm_h100x8", "llava_ov7b_vllm_h100x16", "serve_lite_h100"):
        uri = urlparse(load_config(preset).tracking.uri)
        assert (uri.hostname, uri.port) == (host, port), preset
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in args if "=" in arg)
    assert flags["backend-store-uri"].startswith("postgresql://")
    assert flags["artifacts-destination"].startswith("s3://")
    assert f"{host}:{port}" in flags["allowed-hosts"].split(",")


def test_one_image_and_the_shared_volume_on_every_ray_pod() -> None:
    images = set()
    for path in ("raycluster.yaml", "rayservice.yaml", "mlflow.yaml", "judge.yaml"):
        for doc in _documents(CLUSTER / path):
            text = yaml.safe_dump(doc)
            images |= {line.split("image:")[1].strip() for line in text.splitlines() if "image:" in line}
    images.discard("postgres:16")
    images.add(yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())["docker"]["image"])
    assert len(images) == 1, images
    claim = _one(CLUSTER / "storage.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for source, cluster_spec in _ray_cluster_specs():
        for pod in _pod_specs(cluster_spec):
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert SHARED_MOUNT in mounts, source
            assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert cluster_spec["rayVersion"] == "2.60.0"


def test_the_judge_server_serves_what_the_evaluation_asks() -> None:
    from ppd.eval.judge_eval import JUDGE_CHAT_TEMPLATE

    documents = _documents(CLUSTER / "judge.yaml")
    template = next(d for d in documents if d["kind"] == "ConfigMap")["data"]["chat_template.jinja"]
    assert template == JUDGE_CHAT_TEMPLATE  # the interleaved template, verbatim
    service = next(d for d in documents if d["kind"] == "Service")
    container = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"] if "=" in arg)
    evaluation = load_config(shlex.split(_job("evaluate")["spec"]["entrypoint"])[4])
    eval_cfg = evaluation.eval
    assert eval_cfg.judge == "openai" and flags["model"] == eval_cfg.judge_model
    url = urlparse(eval_cfg.judge_base_url)
    assert (url.hostname, url.port) == (f"{service['metadata']['name']}.ppd.svc.cluster.local", int(flags["port"]))
    assert service["spec"]["ports"][0]["port"] == int(flags["port"])
    assert json.loads(flags["limit-mm-per-prompt"])["image"] == 2 * evaluation.data.shots + 2
    assert flags["chat-template"].startswith(container["volumeMounts"][1]["mountPath"])
