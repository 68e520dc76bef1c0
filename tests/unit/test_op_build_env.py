"""DeepSpeed's JIT op build runs the environment's own ninja, whatever PATH the worker inherited.

Two ninja versions on one PATH (Debian's and pip's) record different command hashes in the op's build log, so a
worker that found the other one rebuilt the op from scratch (~1 min) on every switch. The Train worker (and every
Ray node the project starts) puts the interpreter's bin/ first on PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from ppd_ray.infra.processes import path_with_interpreter_bin

ENV_BIN = Path(sys.executable).parent


@pytest.mark.skipif(shutil.which("ninja", path=str(ENV_BIN)) is None, reason="this environment has no pip ninja")
def test_the_environments_ninja_comes_first_even_when_path_lacks_it():
    path = path_with_interpreter_bin("/usr/bin:/bin")
    assert Path(shutil.which("ninja", path=path)).parent == ENV_BIN
    assert "/usr/bin" in path.split(os.pathsep)
    again = path_with_interpreter_bin(path)  # a second call does not stack another copy
    assert again.split(os.pathsep).count(str(ENV_BIN)) == 1 and again == path
