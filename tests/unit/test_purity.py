"""`ppd` is a pure library: every module imports with ray, deepspeed and mlflow made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# sys.modules[name] = None makes `import name` raise ImportError, and makes importlib.util.find_spec(name) answer
# None, so libraries that merely probe for an optional package (accelerate probes deepspeed) see it as absent.
_IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
BLOCKED = ("ray", "deepspeed", "mlflow")
for name in BLOCKED:
    sys.modules[name] = None
import ppd
imported = ["ppd"]
for module in pkgutil.walk_packages(ppd.__path__, prefix="ppd."):
    importlib.import_module(module.name)
    imported.append(module.name)
for name in BLOCKED:
    assert sys.modules[name] is None, f"{name} was imported"
    leaked = [m for m in sys.modules if m.startswith(name + ".") and sys.modules[m] is not None]
    assert not leaked, f"submodules of {name} were imported: {leaked[:3]}"
print("\\n".join(imported))
"""


def test_every_ppd_module_imports_without_ray_deepspeed_mlflow() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERYTHING], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(result.stdout.split())
    expected = {
        "ppd.config",
        "ppd.models.adapter",
        "ppd.models.checkpoint",
        "ppd.models.codec",
        "ppd.models.factory",
        "ppd.models.schedule",
        "ppd.models.stage_c",
        "ppd.models.text",
        "ppd.sample",
        "ppd.train.loss",
        "ppd.train.step",
    }
    assert expected <= imported
