"""DeepSpeed's JIT op build runs the environment's own ninja, whatever PATH the worker inherited.

Two ninja versions on one PATH (Debian's and pip's) record different command hashes in the op's build log, so a
worker that found the other one rebuilt the op from scratch (~1 min) on every switch.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from ppd_ray.jobs.train_worker import use_environments_ninja

ENV_BIN = Path(sys.executable).parent


@pytest.mark.skipif(shutil.which("ninja", path=str(ENV_BIN)) is None, reason="this environment has no pip ninja")
def test_the_environments_ninja_comes_first_even_when_path_lacks_it(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_environments_ninja()
    assert Path(shutil.which("ninja")).parent == ENV_BIN
    assert "/usr/bin" in path_entries()
    use_environments_ninja()  # a second call does not stack another copy
    assert path_entries().count(str(ENV_BIN)) == 1


def path_entries() -> list[str]:
    return os.environ["PATH"].split(os.pathsep)
