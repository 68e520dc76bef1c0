"""Imports run down the layers only, so a folder can be read (and tested) without the ones above it.

    ppd:      errors, config  <  data, models  <  sample, embed, train  <  eval  <  check
    ppd_ray:  console  <  infra  <  tracking  <  jobs  <  pipelines, serving  <  cli;  ppd never imports ppd_ray

Read from the source (every import statement, also those inside functions), not by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# What each part may import from the project, besides itself. A part is a package or a top-level module.
_BASE = {"ppd.errors", "ppd.config"}  # the library's user-facing errors and its config: every ppd part may use them
ALLOWED = {
    "ppd.errors": set(),
    "ppd.config": set(),
    "ppd.data": _BASE,
    "ppd.models": _BASE,
    "ppd.sample": _BASE | {"ppd.models"},
    "ppd.embed": _BASE | {"ppd.data", "ppd.models"},
    "ppd.train": _BASE | {"ppd.data", "ppd.models"},
    "ppd.eval": _BASE | {"ppd.data", "ppd.models", "ppd.sample", "ppd.embed", "ppd.train"},
    "ppd.check": _BASE | {"ppd.data", "ppd.models", "ppd.sample", "ppd.embed", "ppd.train", "ppd.eval"},
    "ppd_ray.console": set(),
    "ppd_ray.infra": {"ppd_ray.console"},
    "ppd_ray.tracking": {"ppd_ray.console", "ppd_ray.infra"},
    "ppd_ray.jobs": {"ppd", "ppd_ray.console", "ppd_ray.infra", "ppd_ray.tracking"},
    "ppd_ray.pipelines": {"ppd", "ppd_ray.console", "ppd_ray.infra", "ppd_ray.tracking"},
    "ppd_ray.serving": {"ppd", "ppd_ray.console", "ppd_ray.infra"},
    "ppd_ray.cli": {"ppd", "ppd_ray"},
}
# One import that crosses a layer on purpose: the torchvision fix must run before torchvision is imported anywhere,
# and venvs load it at start-up by this name (a .pth file written by `make setup`).
EXCEPTIONS = {("ppd.models.effnet", "ppd.embed.torchvision_compat")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in ("ppd", "ppd_ray")}


def _part(module: str) -> str:
    """The entry of ALLOWED a module belongs to (the longest prefix)."""
    return max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)


def _inside(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


MODULES = sorted(p for package in ("ppd", "ppd_ray") for p in (REPO_ROOT / package).rglob("*.py"))


def test_every_module_belongs_to_a_layer() -> None:
    assert MODULES
    for path in MODULES:
        module = _module_name(path)
        if module in ("ppd", "ppd_ray"):
            continue
        assert any(_inside(module, part) for part in ALLOWED), f"{module} is in no layer of ALLOWED"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_imports_run_down_the_layers(path: Path) -> None:
    module = _module_name(path)
    if module in ("ppd", "ppd_ray"):
        return
    part = _part(module)
    allowed = ALLOWED[part]
    wrong = sorted(
        target
        for target in _project_imports(path)
        if not _inside(target, part)
        and not any(_inside(target, a) for a in allowed)
        and (module, target) not in EXCEPTIONS
    )
    assert not wrong, f"{module} ({part}) imports {wrong}: only {sorted(allowed) or 'nothing'} may be imported"


def test_no_job_imports_another_job() -> None:
    # What jobs share lives in jobs/common.py; a job's worker loop (train_worker) is part of that job.
    own = {"train": {"train_worker"}}
    for path in (REPO_ROOT / "ppd_ray" / "jobs").glob("*.py"):
        job = path.stem
        for target in _project_imports(path):
            if target.startswith("ppd_ray.jobs."):
                imported = target.split(".")[2]
                assert imported in {"common", job, *own.get(job, ())}, f"job {job} imports job {imported}"
