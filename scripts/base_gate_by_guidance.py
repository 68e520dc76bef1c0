"""The toy base's quality gate at several classifier-free guidance scales, side by side (numbers for
docs/results_investigation.md): the gate `ppd toy pretrain-base` measures (object drawn, caption colour and shape, KS of
each reward attribute against the toy world's renders), on the same captions and seeds at every scale.

    python scripts/base_gate_by_guidance.py 1 1.5 2 2.5 3 4 --samples 256 --seed 0 --grids /tmp/gate

One thread per run (the demo's generator actors compute on one each); ~1 min per scale for 256 samples on a 2-core EPYC.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ppd.config import ATTRIBUTES, load_config
from ppd.eval.base_quality import measure_base
from ppd.eval.generate import VariantGenerator

REPO_ROOT = Path(__file__).resolve().parents[1]


def cell(entry: dict, percent: bool) -> str:
    """A gate entry as a table cell, bold where its bound is missed."""
    value = f"{entry['value']:.0%}" if percent else f"{entry['value']:.3f}"
    return value if entry["met"] else f"**{value}**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("guidance", type=float, nargs="+", help="guidance scales to measure (the demo uses 4)")
    parser.add_argument("--base", type=Path, default=REPO_ROOT / "assets" / "toy_base", help="toy base folder")
    parser.add_argument("--samples", type=int, default=256, help="samples per scale (the gate's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gate's captions, sample seeds and renders")
    parser.add_argument("--grids", type=Path, default=None, help="folder for a samples-over-renders strip per scale")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.grids is not None:
        args.grids.mkdir(parents=True, exist_ok=True)
    header = ["guidance", "object", "colour", "shape", *(f"KS {a}" for a in ATTRIBUTES)]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for guidance in args.guidance:
        cfg = load_config("tiny_cpu", [f"model.stage_c_path={args.base.resolve()}", f"eval.guidance={guidance:g}"])
        generator = VariantGenerator(cfg, None)
        grid = None if args.grids is None else args.grids / f"guidance{guidance:g}_seed{args.seed}.png"
        gate = measure_base(generator.generate, cfg.data.toy.image_size, args.samples, args.seed, grid_path=grid)
        row = [f"{guidance:g}", *(cell(gate[m], True) for m in ("object_present", "colour_match", "shape_match"))]
        row += [cell(gate["ks"][a], False) for a in ATTRIBUTES]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
