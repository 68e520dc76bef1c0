"""The Serve app on a local Ray with tiny models, over real HTTP on loopback: every endpoint, bad input, auth,
the embedding cache, interpolation, batching across users, and the reduced load/fault run of scripts/serve_load.py."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ppd.config import load_config
from ppd.models.factory import latent_shape
from ppd.models.stage_c import TOY_CODEC_FACTOR
from ppd_ray.infra.processes import free_port
from ppd_ray.serving.ingress import auth_token
from tests.helpers import serve_load_script

serve_load = serve_load_script()

CAPTION = "a picture of a teal ring"
TOKEN = "test-token-0123456789"
# Small limits so the oversized cases stay small requests.
TEST_OVERRIDES = [
    "serve.limits.max_image_bytes=4096",
    "serve.limits.max_image_pixels=1024",
    "serve.limits.max_body_bytes=65536",
    "serve.limits.max_caption_chars=80",
    "serve.limits.max_steps=20",
    "serve.batch_wait_timeout_s=0.2",
    "serve.generator.replicas=2",  # the kill run needs two
    "serve.generator.cpus=0.3",
    "serve.embedder.cpus=0.2",
    "serve.ingress.cpus=0.2",
    "eval.inference_steps=4",
    "serve.example_pairs_dir=/nonexistent/ppd-test/validation",  # the web page's examples: see test_web.py
]


def _deploy(cfg, runtime_env: dict | None = None) -> None:
    from ray import serve

    from ppd_ray.serving.app import compose

    serve.run(compose(cfg, runtime_env), name=serve_load.APP_NAME, route_prefix="/")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return serve_load.random_adapter(load_config("tiny_cpu"), tmp_path_factory.mktemp("serve") / "adapter")


@pytest.fixture(scope="module")
def app(ray_local, adapter_dir):
    """(base URL, config) of the app; Serve is shut down after the module."""
    from ray import serve

    cfg = load_config("tiny_cpu", [f"serve.adapter_dir={adapter_dir}", *TEST_OVERRIDES])
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _deploy(cfg)
    url = f"http://127.0.0.1:{port}"
    yield url, cfg
    serve.shutdown()


@pytest.fixture(scope="module")
def client(app):
    with httpx.Client(base_url=app[0], timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def users(client) -> list[str]:
    handles = []
    for user in range(3):
        response = client.post("/v1/users", json={"pairs": serve_load.user_pairs(user)})
        assert response.status_code == 201, response.text
        handles.append(response.json()["handle"])
    return handles


def _images(response: httpx.Response) -> list[bytes]:
    assert response.status_code == 200, response.text
    return [base64.b64decode(image["png_base64"]) for image in response.json()["images"]]


def _png(size: int, noise: bool = False) -> str:
    return serve_load.png_base64((120, 30, 200), size=size, noise_seed=1 if noise else None)


# --- happy paths -----------------------------------------------------------------------------------------------------


def test_healthz_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/users", "/v1/users/{handle}", "/v1/generate", "/v1/personalize", "/healthz"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_web_page_and_its_settings_with_auth_off(client, app):
    _, cfg = app
    page = client.get("/")
    assert page.status_code == 200 and "/ui/app.js" in page.text
    settings = client.get("/ui/settings").json()
    assert settings["auth_required"] is False  # loopback, auth auto: the page asks for no token
    assert settings["shots"] == cfg.data.shots and settings["max_user_scale"] == cfg.serve.limits.max_user_scale
    missing = client.get("/v1/example-pairs")
    assert missing.status_code == 404 and "/nonexistent/ppd-test/validation" in missing.json()["message"]
    too_many = client.get("/v1/example-pairs", params={"count": 17})
    assert too_many.status_code == 422 and too_many.json()["field"] == "count"
    assert client.get("/ui/secrets.txt").status_code == 404


def test_create_user_returns_an_opaque_handle_and_never_the_embedding(client, users):
    created = client.post("/v1/users", json={"pairs": serve_load.user_pairs(10)})
    assert created.status_code == 201
    body = created.json()
    assert body["handle"].startswith("u_") and len(body["handle"]) == 34  # 192 random bits
    assert body["embedding_shape"] == [4, 64] and "embedding" not in body
    profile = client.get(f"/v1/users/{body['handle']}")
    assert profile.status_code == 200
    assert set(profile.json()) == {"handle", "profile", "embedding_shape", "model_id", "created_at"}
    assert len(set(users)) == 3


def test_same_pairs_hit_the_cache_and_skip_the_embedder(client):
    pairs = serve_load.user_pairs(20)
    first = client.post("/v1/users", json={"pairs": pairs}).json()
    before = client.get("/v1/stats").json()["embedder"]
    second = client.post("/v1/users", json={"pairs": pairs}).json()
    after = client.get("/v1/stats").json()["embedder"]
    assert not first["cached"] and second["cached"]
    assert second["handle"] != first["handle"]  # a handle is per registration, not derived from the pairs
    assert after["model_runs"] == before["model_runs"]
    assert after["cache_hits"] == before["cache_hits"] + 1


def test_generate_for_a_user_differs_from_the_base_and_from_another_user(app, client, users):
    request = {"caption": CAPTION, "seed": 3, "num_images": 2}
    user_a = _images(client.post("/v1/generate", json={**request, "user": users[0]}))
    user_b = _images(client.post("/v1/generate", json={**request, "user": users[1]}))
    base = _images(client.post("/v1/generate", json=request))
    assert len(user_a) == 2 and user_a[0] != user_a[1]  # seeds 3 and 4
    assert user_a != base and user_a != user_b
    with Image.open(io.BytesIO(user_a[0])) as image:
        side = latent_shape(app[1].model)[1] * TOY_CODEC_FACTOR  # the toy codec's pixels per latent side
        assert image.size == (side, side)
    scale_zero = _images(client.post("/v1/generate", json={**request, "user": users[0], "user_scale": 0}))
    assert scale_zero == base  # s = 0 is the base model exactly


def test_generate_png_response(client, users):
    response = client.post(
        "/v1/generate", json={"caption": CAPTION, "user": users[0], "seed": 5, "response_format": "png"}
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    as_json = _images(client.post("/v1/generate", json={"caption": CAPTION, "user": users[0], "seed": 5}))
    assert response.content == as_json[0]


def test_interpolation_with_weights_one_zero_equals_the_single_user(client, users):
    request = {"caption": CAPTION, "seed": 11}
    single = _images(client.post("/v1/generate", json={**request, "user": users[0]}))
    mix = [{"user": users[0], "weight": 1.0}, {"user": users[1], "weight": 0.0}]
    mixed = _images(client.post("/v1/generate", json={**request, "mix": mix}))
    assert mixed == single
    half = [{"user": users[0], "weight": 0.5}, {"user": users[1], "weight": 0.5}]
    assert _images(client.post("/v1/generate", json={**request, "mix": half})) != single


def test_personalize_in_one_call_matches_register_then_generate(client):
    pairs = serve_load.user_pairs(30)
    request = {"caption": CAPTION, "seed": 2}
    one_call = client.post("/v1/personalize", json={**request, "pairs": pairs})
    handle = client.post("/v1/users", json={"pairs": pairs}).json()["handle"]
    two_calls = client.post("/v1/generate", json={**request, "user": handle})
    assert _images(one_call) == _images(two_calls)
    assert one_call.json()["embedding_shape"] == [4, 64]


def test_delete_user(client):
    handle = client.post("/v1/users", json={"pairs": serve_load.user_pairs(40)}).json()["handle"]
    assert client.delete(f"/v1/users/{handle}").status_code == 204
    assert client.get(f"/v1/users/{handle}").status_code == 404
    assert client.delete(f"/v1/users/{handle}").status_code == 404
    gone = client.post("/v1/generate", json={"caption": CAPTION, "user": handle})
    assert gone.status_code == 404 and gone.json()["field"] == "user"


def test_concurrent_requests_of_different_users_share_a_sampler_call(client, users):
    def generate(index: int) -> int:
        body = {"caption": CAPTION, "user": users[index % len(users)], "seed": index}
        return client.post("/v1/generate", json=body).status_code

    with ThreadPoolExecutor(12) as pool:
        assert set(pool.map(generate, range(12))) == {200}
    # Two replicas, each answering its own stats: sum what one replica saw across a few calls.
    batch_sizes: dict[str, int] = {}
    for _ in range(6):
        for size, count in client.get("/v1/stats").json()["generator"]["batch_sizes"].items():
            batch_sizes[size] = max(batch_sizes.get(size, 0), count)
    assert max(int(size) for size in batch_sizes) > 1, batch_sizes


# --- bad input -------------------------------------------------------------------------------------------------------


def _pairs_with(index: int, **change) -> dict:
    pairs = serve_load.user_pairs(0)
    pairs[index] = {**pairs[index], **change}
    return {"pairs": pairs}


GEN = {"caption": CAPTION, "steps": 2}
MALFORMED = [
    # (name, path, body (dict or raw bytes), status, field named in the message)
    ("three pairs", "/v1/users", {"pairs": serve_load.user_pairs(0)[:3]}, 422, "pairs"),
    ("five pairs", "/v1/users", {"pairs": serve_load.user_pairs(0) + serve_load.user_pairs(1)[:1]}, 422, "pairs"),
    ("no pairs key", "/v1/users", {}, 422, "pairs"),
    ("not base64", "/v1/users", _pairs_with(0, image_0="%%%"), 422, "pairs[0].image_0"),
    ("image URL", "/v1/users", _pairs_with(1, image_1="https://example.com/x.png"), 422, "pairs[1].image_1"),
    ("undecodable", "/v1/users", _pairs_with(2, image_0=base64.b64encode(b"nope").decode()), 422, "pairs[2].image_0"),
    ("too many bytes", "/v1/users", _pairs_with(0, image_1=_png(48, noise=True)), 413, "pairs[0].image_1"),
    ("too many pixels", "/v1/users", _pairs_with(3, image_0=_png(40)), 422, "pairs[3].image_0"),
    ("preferred 2", "/v1/users", _pairs_with(0, preferred=2), 422, "pairs[0].preferred"),
    ("empty pair caption", "/v1/users", _pairs_with(1, caption=" "), 422, "pairs[1].caption"),
    ("empty caption", "/v1/generate", {**GEN, "caption": ""}, 422, "caption"),
    ("long caption", "/v1/generate", {**GEN, "caption": "a" * 81}, 422, "caption"),
    ("caption not a string", "/v1/generate", {**GEN, "caption": 7}, 422, "caption"),
    ("steps 0", "/v1/generate", {**GEN, "steps": 0}, 422, "steps"),
    ("steps too many", "/v1/generate", {**GEN, "steps": 21}, 422, "steps"),
    ("images 0", "/v1/generate", {**GEN, "num_images": 0}, 422, "num_images"),
    ("images too many", "/v1/generate", {**GEN, "num_images": 5}, 422, "num_images"),
    ("guidance negative", "/v1/generate", {**GEN, "guidance": -1}, 422, "guidance"),
    ("guidance too high", "/v1/generate", {**GEN, "guidance": 1e9}, 422, "guidance"),
    ("user scale too high", "/v1/generate", {**GEN, "user_scale": 99}, 422, "user_scale"),
    ("png of two images", "/v1/generate", {**GEN, "num_images": 2, "response_format": "png"}, 422, "response_format"),
    ("unknown handle", "/v1/generate", {**GEN, "user": "u_" + "A" * 32}, 404, "user"),
    ("malformed handle", "/v1/generate", {**GEN, "user": "42"}, 404, "user"),
    ("unknown field", "/v1/generate", {**GEN, "colour": "red"}, 422, "colour"),
    ("user and mix", "/v1/generate", {**GEN, "user": "u_x", "mix": []}, 422, "user or mix"),
    ("mix negative", "/v1/generate", {**GEN, "mix": [{"user": "u_a", "weight": -1}]}, 422, "mix[0].weight"),
    ("mix NaN", "/v1/generate", b'{"caption": "x", "mix": [{"user": "u", "weight": NaN}]}', 422, "mix[0].weight"),
    ("not JSON", "/v1/generate", b"{caption:", 422, "JSON"),
    ("body too large", "/v1/generate", b"x" * 70_000, 413, "body"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "field"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_input_is_a_4xx_naming_the_field(client, name, path, body, status, field):
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert field in response.json()["message"], response.json()


def test_mix_checks_that_need_real_handles(client, users):
    cases = [
        ([{"user": users[0], "weight": 0.3}, {"user": users[1], "weight": 0.3}], "mix", "sum to 1"),
        ([{"user": users[0], "weight": 0.5}, {"user": users[0], "weight": 0.5}], "mix[1].user", "twice"),
        ([{"user": users[0], "weight": 1.0}], "mix", "2 to"),
        ([{"user": users[0], "weight": 0.5}, {"user": "u_" + "B" * 32, "weight": 0.5}], "mix[1].user", "unknown"),
    ]
    for mix, field, words in cases:
        response = client.post("/v1/generate", json={**GEN, "mix": mix})
        assert 400 <= response.status_code < 500 and response.json()["field"] == field, response.text
        assert words in response.json()["message"]


def test_unknown_handle_paths_are_404(client):
    assert client.get("/v1/users/not-a-handle").status_code == 404
    assert client.get("/v1/users/u_" + "C" * 32).json()["field"] == "handle"


# --- load and fault (reduced form of scripts/serve_load.py) ---------------------------------------------------------


def test_reduced_load_has_no_server_errors(app, users):
    url, _ = app
    report = serve_load.measure_load(url, users, requests=120, concurrency=8, malformed=0.3, steps=2)
    assert report["server_errors"] == 0 and report["client_errors"] == 0, report
    assert report["unexpected"] == 0, report["examples"]


def test_killing_a_generator_replica_under_load_loses_almost_nothing(app, users):
    url, _ = app
    report = serve_load.measure_kill(url, users, requests=80, concurrency=8, steps=2)
    assert report["failed_pct"] < 5, report
    assert report["recovery_s"] is not None and report["recovery_s"] < 60, report


# --- auth ------------------------------------------------------------------------------------------------------------


def test_auth_decision():
    exposed = load_config("tiny_cpu", ["serve.auth_token_env=PPD_TEST_TOKEN_UNSET"])
    assert auth_token(exposed, "127.0.0.1") is None and auth_token(exposed, "::1") is None  # loopback: off
    for host in ("0.0.0.0", "10.1.2.3", None):  # exposed (or unknown): on, and no token is a start-up error
        with pytest.raises(RuntimeError, match="PPD_TEST_TOKEN_UNSET"):
            auth_token(exposed, host)
    assert auth_token(load_config("tiny_cpu", ["serve.auth=off"]), "0.0.0.0") is None


def test_auth_on_requires_the_bearer_token(app, monkeypatch):
    url, cfg = app
    monkeypatch.setenv("PPD_API_TOKEN", TOKEN)
    assert auth_token(cfg.with_overrides(["serve.auth=on"]), "127.0.0.1") == TOKEN.encode()
    # Last in the module: redeploys the app with auth on (the token reaches the replicas through runtime_env).
    _deploy(cfg.with_overrides(["serve.auth=on"]), runtime_env={"env_vars": {"PPD_API_TOKEN": TOKEN}})
    body = {"pairs": serve_load.user_pairs(0)}
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("/healthz").status_code == 200  # probes stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            denied = http.post("/v1/users", json=body, headers=headers)
            assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        bad_body = http.post("/v1/generate", content=json.dumps({"steps": 0}), headers={})
        assert bad_body.status_code == 401  # auth before validation: no probing without a token
        allowed = http.post("/v1/users", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 201
