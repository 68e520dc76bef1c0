"""Ray 2.60 token auth: the project owns the token of every Ray it starts, and uses yours for heads it did not start.

Ray 2.60 runs new clusters in token mode. Left to itself, `ray.init()` of a new local cluster writes a token to the
user's home directory, and `ray start` in token mode refuses to start without one there. Neither may depend on, or
change, what a person keeps in their home directory, so every Ray this project starts gets a fresh token of its own:

- `new_token_file(dir)`: a random 256-bit token in a private file; `token_env(path)` hands it to `ray start`, to the
  jobs (through `RAY_AUTH_TOKEN_PATH`) and `bearer(token)` to the Jobs client;
- `start_or_connect(...)`: `ray.init` for job entry points, `ppd serve` and tests: a new local Ray gets a private
  token first; against `RAY_ADDRESS` (a head someone else started) the user's own token is used (Ray's own lookup),
  and a missing or wrong one is a one-line `JobError` saying what to run.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from ppd_ray.console import JobError

TOKEN_FILE = "auth_token"
MODE_VAR, TOKEN_PATH_VAR, TOKEN_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"

# What a person can do about a head that wants a token we do not have.
TOKEN_HELP = (
    "pass the head's token with RAY_AUTH_TOKEN_PATH=<file> or RAY_AUTH_TOKEN=<token> "
    "(on the head: `ray get-auth-token`)"
)


def new_token_file(directory: Path) -> Path:
    """Write a fresh random token (64 hex characters, as `ray get-auth-token --generate` makes) readable by us only."""
    path = Path(directory) / TOKEN_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def token_env(token_path: Path) -> dict[str, str]:
    """Environment that puts Ray (`ray start`, `ray.init`, jobs, workers) in token mode with this token file."""
    return {MODE_VAR: "token", TOKEN_PATH_VAR: str(token_path)}


def bearer(token: str) -> dict[str, str]:
    """The HTTP header Ray's dashboard (Jobs API) expects."""
    return {"Authorization": f"Bearer {token}"}


def user_token_headers() -> dict[str, str]:
    """The caller's own token for a head this project did not start (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or Ray's
    default token file, looked up by Ray itself); {} when there is none."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since the last lookup
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True))


_private_token_dir: Path | None = None


def use_private_token() -> Path:
    """Put this process (and the local Ray it is about to start) in token mode with a private token; returns its file.

    Idempotent per process: the first call writes the token into a temporary folder (removed at exit) and sets
    RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH in os.environ, which the raylet and every worker inherit.
    """
    global _private_token_dir
    if _private_token_dir is None:
        _private_token_dir = Path(tempfile.mkdtemp(prefix="ppd-ray-auth-"))
        atexit.register(shutil.rmtree, _private_token_dir, ignore_errors=True)
    path = _private_token_dir / TOKEN_FILE
    if not path.is_file():
        new_token_file(_private_token_dir)
    os.environ.pop(TOKEN_VAR, None)  # a token in the environment would win over the file
    os.environ.update(token_env(path))
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # Ray reads RAY_AUTH_MODE into a cached config at import: refresh it (as Ray itself does)
    AuthenticationTokenLoader.instance().reset_cache()
    return path


def start_or_connect(**init_kwargs) -> None:
    """`ray.init`: connect to RAY_ADDRESS with the user's token, or start a local Ray with a private one."""
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        use_private_token()
        ray.init(**init_kwargs)
        return
    if os.environ.get(MODE_VAR) is None and user_token_headers():
        os.environ[MODE_VAR] = "token"  # a token is at hand: send it (heads started in token mode require it)
    try:
        ray.init(address=address, **init_kwargs)
    except AuthenticationError as err:
        raise JobError(f"the Ray cluster at {address} refused this client ({_first_line(err)}): {TOKEN_HELP}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
