"""Ingress deployment: the versioned HTTP API (FastAPI, OpenAPI at /docs) over the store, Embedder and Generator.

Every client mistake is a 4xx whose message names the field (pydantic: 422; limits: 422/413; unknown handle: 404;
auth: 401); downstream calls carry a deadline (504 past it) and retry once a replica has died (503 if none is
left), so no request hangs and bad input never becomes a 5xx. No response ever carries an embedding.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import secrets
from typing import Any

import tenacity
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from ppd.config import PPDConfig
from ppd.data.example_pairs import ExamplesMissing
from ppd_ray.serving.embedder import EmbeddedUser
from ppd_ray.serving.generator import GenerationJob
from ppd_ray.serving.schemas import (
    CreateUserRequest,
    ErrorResponse,
    ExamplePairsResponse,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    PageSettings,
    PersonalizeRequest,
    PersonalizeResponse,
    RequestError,
    ResolvedGeneration,
    UserCreated,
    UserProfile,
    check_generation,
    check_handle,
    check_mix,
    check_pairs,
)
from ppd_ray.serving.web import ASSETS, ExamplePairs, WebPage

logger = logging.getLogger("ray.serve")
# A replica that died or is being replaced: the same call on another (or the restarted) replica may succeed.
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
DEFAULT_MAX_BODY_BYTES = 2 * 2**20
_ERRORS = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "unknown user handle"},
    413: {"model": ErrorResponse, "description": "body or image too large"},
    422: {"model": ErrorResponse, "description": "invalid request (the message names the field)"},
    503: {"model": ErrorResponse, "description": "overloaded or a replica is restarting: retry"},
    504: {"model": ErrorResponse, "description": "the model did not answer in time"},
}


class ServiceError(Exception):
    """The server cannot answer now (overload, dead replica, deadline): 503/504, never for bad input."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit, by Content-Length or while it streams in."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _too_large(limit)(scope, receive, send)
        received, started = 0, False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, "body_too_large", f"request body is larger than {limit} bytes", field="body")


def _error(status: int, error: str, message: str, field: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=error, field=field, message=message).model_dump()
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


api = FastAPI(
    title="PPD personalised text-to-image",
    version="1",
    description="Register a user from 4 preference pairs, then generate images in that user's taste.",
)
api.add_middleware(BodyLimit)
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>` when auth is on")


async def authorized(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """401 unless auth is off or the bearer token matches; runs before the body is validated."""
    token: bytes | None = getattr(request.app.state, "auth_token", None)
    if token is None:
        return
    given = b"" if credentials is None else credentials.credentials.encode()
    if not secrets.compare_digest(given, token):
        raise RequestError(401, "Authorization", "missing or wrong bearer token")


Authorized = Depends(authorized)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = []
    for item in err.errors():
        field = _field_name(item.get("loc", ()))
        problems.append((field, f"{field}: {item.get('msg', 'invalid')}"))
    field = problems[0][0] if problems else None
    return _error(422, "invalid_request", "; ".join(text for _, text in problems) or "invalid request", field)


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    error = {401: "unauthorized", 404: "unknown_user", 413: "too_large"}.get(err.status, "invalid_request")
    return _error(err.status, error, f"{err.field}: {err.message}", err.field)


@api.exception_handler(ServiceError)
async def _service_error(request: Request, err: ServiceError) -> JSONResponse:
    return _error(err.status, "unavailable" if err.status == 503 else "timeout", err.message)


def _field_name(location: tuple | list) -> str:
    # ("body", "pairs", 0, "preferred") -> "pairs[0].preferred"; the "body" prefix says nothing to a client.
    parts = [p for p in location if p not in ("body", "query", "path")]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_host() -> str | None:
    """The address Serve's HTTP proxy binds (None when it cannot be read: then the server counts as exposed)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # a private API: if it moves, fail safe (auth on), do not fail the start-up
        return None


def auth_token(cfg: PPDConfig, bind_host: str | None) -> bytes | None:
    """The bearer token when auth is on (None = off); refuses to start exposed without one."""
    required = cfg.serve.auth == "on" or (cfg.serve.auth == "auto" and not _is_loopback(bind_host))
    if not required:
        return None
    token = os.environ.get(cfg.serve.auth_token_env, "")
    if not token:
        reason = "serve.auth=on" if cfg.serve.auth == "on" else f"HTTP binds the non-loopback address {bind_host!r}"
        raise RuntimeError(
            f"auth is required ({reason}) but ${cfg.serve.auth_token_env} is empty: set it on the serving "
            "nodes, bind 127.0.0.1, or pass serve.auth=off deliberately"
        )
    return token.encode()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP routes; holds handles to the store, the Embedder and the Generator (composition by DeploymentHandle)."""

    def __init__(
        self,
        config: dict,
        embedder: DeploymentHandle,
        generator: DeploymentHandle,
        store: DeploymentHandle,
    ) -> None:
        cfg = PPDConfig.from_dict(config)
        self.embedder, self.generator, self.store = embedder, generator, store
        self.limits = cfg.serve.limits
        self.shots = cfg.data.shots
        self.timeout_s = cfg.serve.request_timeout_s
        self.defaults = {
            "default_steps": cfg.eval.inference_steps,
            "default_guidance": cfg.eval.guidance,
            "default_user_scale": cfg.model.user_scale,
        }
        # The ASGI middleware and the auth dependency run outside this object: they read the app's state.
        api.state.max_body_bytes = self.limits.max_body_bytes
        api.state.auth_token = auth_token(cfg, _bind_host())
        self._compatible = False
        self.page = WebPage()
        self.examples = ExamplePairs(cfg)
        self.page_settings = PageSettings(
            auth_required=api.state.auth_token is not None,
            shots=self.shots,
            default_user_scale=cfg.model.user_scale,
            max_user_scale=self.limits.max_user_scale,
            default_steps=cfg.eval.inference_steps,
            default_guidance=cfg.eval.guidance,
            max_images=self.limits.max_images,
            max_caption_chars=self.limits.max_caption_chars,
            max_image_bytes=self.examples.budget.max_bytes,  # what fits N pairs in one request body
            max_image_pixels=self.limits.max_image_pixels,
        )

    async def _call(self, method: Any, *args: Any, retries: int = 1) -> Any:
        """`await method.remote(*args)` with the deadline; a dead replica is retried (generation is seeded)."""
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(REPLICA_FAILURES),
            stop=tenacity.stop_after_attempt(retries + 1),
            wait=tenacity.wait_incrementing(start=0.2, increment=0.2),  # 0.2 s, 0.4 s, ...: Serve starts a new one
            before_sleep=lambda state: logger.warning(
                "retrying after a replica failure: %s", type(state.outcome.exception()).__name__
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await asyncio.wait_for(method.remote(*args), self.timeout_s)
        except TimeoutError:
            raise ServiceError(504, f"no answer within {self.timeout_s:g} s; retry later") from None
        except BackPressureError:
            raise ServiceError(503, "the server is at capacity; retry later") from None
        except REPLICA_FAILURES:
            raise ServiceError(503, "a model replica is restarting; retry shortly") from None

    async def _ensure_compatible(self) -> None:
        """Once per replica: the embedder's [L, d] must be what the adapter reads (a misconfiguration, not a 4xx)."""
        if self._compatible:
            return
        embedder, generator = await asyncio.gather(self._call(self.embedder.info), self._call(self.generator.info))
        if embedder["embedding_shape"] != generator["embedding_shape"]:
            raise RuntimeError(
                f"the embedder ({embedder['model_id']}) makes embeddings {embedder['embedding_shape']} but the "
                f"adapter reads {generator['embedding_shape']}: serve the adapter trained with this embed config"
            )
        self._compatible = True

    async def _embed(self, body: CreateUserRequest | PersonalizeRequest) -> EmbeddedUser:
        pairs = check_pairs(body.pairs, self.shots, self.limits)
        await self._ensure_compatible()
        result = await self._call(self.embedder.embed, pairs, retries=2)
        if isinstance(result, str):
            raise RequestError(422, "pairs", result)
        return result

    async def _generate(self, job: GenerationJob) -> list[bytes]:
        return await self._call(self.generator.generate, job, retries=2)

    def _job(self, settings: ResolvedGeneration, users: list | None = None, weights: list | None = None):
        return GenerationJob(
            caption=settings.caption,
            seeds=settings.seeds,
            steps=settings.steps,
            guidance=settings.guidance,
            user_scale=settings.user_scale,
            users=users,
            weights=weights,
        )

    @staticmethod
    def _images(settings: ResolvedGeneration, pngs: list[bytes], response_format: str, **extra: Any):
        if response_format == "png":
            return Response(content=pngs[0], media_type="image/png", headers={"X-Seed": str(settings.seeds[0])})
        images = [
            GeneratedImage(seed=seed, png_base64=base64.b64encode(png).decode())
            for seed, png in zip(settings.seeds, pngs, strict=True)
        ]
        model = PersonalizeResponse if extra else GenerateResponse
        return model(
            caption=settings.caption,
            images=images,
            steps=settings.steps,
            guidance=settings.guidance,
            user_scale=settings.user_scale,
            **extra,
        )

    # --- routes ------------------------------------------------------------------------------------------------------

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict:
        """Liveness and readiness: the embedder and generator answer and agree on the embedding shape."""
        await self._ensure_compatible()
        return {"status": "ok"}

    @api.post("/v1/users", response_model=UserCreated, status_code=201, responses=_ERRORS, tags=["users"])
    async def create_user(self, body: CreateUserRequest, _: None = Authorized) -> UserCreated:
        """Register a user from N = 4 preference pairs; returns an opaque handle (the embedding stays here)."""
        user = await self._embed(body)
        handle = await self._call(self.store.add, user.embedding, user.profile, user.model_id)
        return UserCreated(
            handle=handle,
            profile=user.profile,
            embedding_shape=list(user.embedding.shape),
            model_id=user.model_id,
            cached=user.cached,
        )

    @api.get("/v1/users/{handle}", response_model=UserProfile, responses=_ERRORS, tags=["users"])
    async def get_user(self, handle: str, _: None = Authorized) -> UserProfile:
        """A user's profile text and embedding shape (never the embedding)."""
        profile = await self._call(self.store.profile, check_handle(handle, "handle"))
        if profile is None:
            raise RequestError(404, "handle", "unknown user handle")
        return UserProfile(**profile)

    @api.delete("/v1/users/{handle}", status_code=204, responses=_ERRORS, tags=["users"])
    async def delete_user(self, handle: str, _: None = Authorized) -> Response:
        """Forget a user: the handle stops working."""
        if not await self._call(self.store.delete, check_handle(handle, "handle")):
            raise RequestError(404, "handle", "unknown user handle")
        return Response(status_code=204)

    @api.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={**_ERRORS, 200: {"content": {"image/png": {}}}},
        tags=["generation"],
    )
    async def generate(self, body: GenerateRequest, _: None = Authorized):
        """Images for a caption: for a stored user, a weighted mix of users, or the base model (no user)."""
        settings = check_generation(body, self.limits, **self.defaults)
        handles, fields, weights = [], [], None
        if body.user is not None:
            handles, fields = [check_handle(body.user, "user")], ["user"]
        elif body.mix is not None:
            handles, weights = check_mix(body.mix, self.limits)
            fields = [f"mix[{i}].user" for i in range(len(handles))]
            for handle, field in zip(handles, fields, strict=True):
                check_handle(handle, field)
        users = None
        if handles:
            users = await self._call(self.store.embeddings, handles)
            for user, field in zip(users, fields, strict=True):
                if user is None:
                    raise RequestError(404, field, "unknown user handle")
            await self._ensure_compatible()
        pngs = await self._generate(self._job(settings, users, weights))
        return self._images(settings, pngs, body.response_format)

    @api.post(
        "/v1/personalize",
        response_model=PersonalizeResponse,
        responses={**_ERRORS, 200: {"content": {"image/png": {}}}},
        tags=["generation"],
    )
    async def personalize(self, body: PersonalizeRequest, _: None = Authorized):
        """A new user in one call: N pairs + a caption -> images in that user's taste (nothing is stored)."""
        settings = check_generation(body, self.limits, **self.defaults)
        user = await self._embed(body)
        pngs = await self._generate(self._job(settings, [user.embedding]))
        if body.response_format == "png":
            return self._images(settings, pngs, "png")
        return self._images(settings, pngs, "json", profile=user.profile, embedding_shape=list(user.embedding.shape))

    # --- the web page (ppd_ray/serving/web/; it calls the routes above like any client) ------------------------------------------

    @api.get("/", include_in_schema=False)
    async def page(self) -> Response:
        """The web page: pick the preferred image of N pairs, personalise, compare base and personalised images."""
        return self.page.response("index.html")

    @api.get("/ui/settings", response_model=PageSettings, tags=["web"])
    async def settings(self) -> PageSettings:
        """What the page needs before its first call: is auth on, N, slider and image limits (open, like /healthz)."""
        return self.page_settings

    @api.get("/ui/{name}", include_in_schema=False)
    async def page_asset(self, name: str) -> Response:
        if name not in ASSETS or name == "index.html":  # the page itself is served at / only
            return _error(404, "not_found", f"{name}: no such file", field="path")
        return self.page.response(name)

    @api.get("/v1/example-pairs", response_model=ExamplePairsResponse, responses=_ERRORS, tags=["web"])
    async def example_pairs(
        self,
        count: int | None = Query(None, ge=1, description="pairs to return (default: N, the pairs a user needs)"),
        seed: int = Query(0, ge=0, le=2**31 - 1, description="the same seed returns the same pairs"),
        _: None = Authorized,
    ):
        """Example preference pairs from the served world (serve.example_pairs_dir; 404 when it is missing)."""
        count = self.shots if count is None else count
        if count > self.limits.max_example_pairs:
            raise RequestError(422, "count", f"must be at most {self.limits.max_example_pairs}, got {count}")
        try:
            return await asyncio.to_thread(self.examples.sample, count, seed)
        except ExamplesMissing as err:
            return _error(404, "no_example_pairs", str(err))  # the server's set-up, not the request, is at fault

    @api.get("/v1/stats", tags=["ops"], responses=_ERRORS)
    async def stats(self, _: None = Authorized) -> dict:
        """Counters of one Embedder and one Generator replica (cache hits, model runs, batch sizes)."""
        embedder, generator = await asyncio.gather(self._call(self.embedder.stats), self._call(self.generator.stats))
        return {"embedder": embedder, "generator": generator}
