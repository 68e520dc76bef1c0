"""Helpers shared by the tests (one copy each): PNG bytes of a pixel array or of one colour, and the processes still
running that mention a path or address (what a command should have stopped), a toy world holding only its one-reward
users."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ppd.eval.rewards import png_bytes

_OWN_PID = os.getpid()


def png_of(pixels: np.ndarray) -> bytes:
    """PNG bytes of pixels [H, W, 3] (any integer dtype, values 0..255)."""
    return png_bytes(np.asarray(pixels).astype(np.uint8))


def solid_png(colour: tuple[int, int, int], width: int, height: int | None = None) -> bytes:
    """PNG bytes of a `width` x `height` (default square) image of one colour."""
    return png_of(np.broadcast_to(np.asarray(colour, np.uint8), (height or width, width, 3)))


def processes_mentioning(text: str) -> list[str]:
    """`pid: command line` of every process on this machine (but this one) whose command line contains `text`.

    Read from /proc rather than `pgrep -f`, whose pattern is a regex: paths and addresses hold dots."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == _OWN_PID:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text in command:
            found.append(f"{entry.name}: {command.strip()}")
    return found


def one_reward_world(tmp_path: Path) -> Path:
    """A toy-world folder holding only the manifest's one-reward users (all the demo's job planning reads of it)."""
    world = tmp_path / "toy"
    world.mkdir(exist_ok=True)
    users = {"brightness": 100, "saturation": 101, "centredness": 102, "warmth": 103, "size": 104}
    (world / "manifest.json").write_text(json.dumps({"one_reward_users": users}))
    return world
