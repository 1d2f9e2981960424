"""What a captured denoising loop binds where: pure planning shared by the GPU backends.

A loop is a list of `Run`s of one component. Capturing it as one graph bakes every address in,
but the pipeline allocates fresh buffers for every call, so a captured graph owns static
memory ("arenas") and the backend copies the live buffers in before a replay and out after it.
Everything here is data about that layout, computed from the runs' structure alone, so it is
tested without a GPU:

- `slots` / `buffers`: which distinct buffer fills each slot of each run (the structure a graph
  is valid for) and the buffers in that numbering;
- `loop_plan`: the arenas, each step's (arena, offset) per tensor, and the copies in and out.
  A tensor that reads a different, never-written buffer at every step (the coefficient row, the
  step noise) becomes one table arena with one aligned row per step; every other buffer (the
  ping-pong latents and state, the text embeddings, a shared zero noise) gets its own arena.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ldm_deploy.engine.backends import Run

# Device addresses handed to kernels are kept 256-byte aligned: cudaMalloc's own alignment,
# and what vectorised loads in TensorRT's and cuBLAS's kernels assume.
ALIGNMENT = 256


def align(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    return -(-nbytes // alignment) * alignment


def slots(runs: list[Run]) -> tuple:
    """Which distinct buffer (numbered by first appearance) fills each slot of each run."""
    ids: dict[int, int] = {}
    out = []
    for run in runs:
        for name, t in list(run.inputs.items()) + list(run.outputs.items()):
            out.append((name, ids.setdefault(id(t), len(ids))))
    return tuple(out)


def buffers(runs: list[Run]) -> list:
    """The distinct buffers of `runs`, in first-appearance order (the numbering of `slots`)."""
    seen: dict[int, object] = {}
    for run in runs:
        for t in list(run.inputs.values()) + list(run.outputs.values()):
            seen.setdefault(id(t), t)
    return list(seen.values())


@dataclass(frozen=True)
class Place:
    """Where one tensor of one step lives in a captured loop's static memory."""

    arena: str  # "table:<tensor>" (one row per step) or "buffer:<index>"
    offset: int  # bytes from the arena's start (a multiple of ALIGNMENT)


@dataclass(frozen=True)
class LoopPlan:
    arenas: dict[str, int]  # arena -> bytes to allocate
    steps: tuple[dict[str, Place], ...]  # per step: tensor name -> place
    copy_in: tuple[tuple[int, Place, int], ...]  # (live buffer index, place, bytes) before a replay
    copy_out: tuple[tuple[Place, int, int], ...]  # (place, live buffer index, bytes) after a replay


def loop_plan(runs: list[Run], nbytes: Callable[[object], int], alignment: int = ALIGNMENT) -> LoopPlan:
    """Lay out the static memory of a captured loop; `nbytes(buffer)` gives a buffer's size.

    Copies in: every buffer whose first use is a read (the start latents and state, the text
    embeddings, each step's row and noise). Copies out: every buffer some step writes."""
    live = buffers(runs)
    index = {id(t): i for i, t in enumerate(live)}
    written = {index[id(t)] for r in runs for t in r.outputs.values()}
    first_read: set[int] = set()
    seen: set[int] = set()
    for r in runs:
        for t in r.inputs.values():
            if index[id(t)] not in seen:
                first_read.add(index[id(t)])
            seen.add(index[id(t)])
        seen.update(index[id(t)] for t in r.outputs.values())

    tables = _tables(runs, index, written)
    arenas: dict[str, int] = {}
    places: dict[int, Place] = {}
    for name, rows in tables.items():
        row = align(max(nbytes(live[i]) for i in rows), alignment)
        arenas[f"table:{name}"] = row * len(rows)
        for step, i in enumerate(rows):
            places[i] = Place(f"table:{name}", step * row)
    for i, t in enumerate(live):
        if i not in places:
            arenas[f"buffer:{i}"] = align(nbytes(t), alignment)
            places[i] = Place(f"buffer:{i}", 0)

    steps = tuple(
        {name: places[index[id(t)]] for name, t in list(r.inputs.items()) + list(r.outputs.items())}
        for r in runs
    )
    copy_in = tuple((i, places[i], nbytes(live[i])) for i in sorted(first_read))
    copy_out = tuple((places[i], i, nbytes(live[i])) for i in sorted(written))
    return LoopPlan(arenas, steps, copy_in, copy_out)


def _tables(runs: list[Run], index: dict[int, int], written: set[int]) -> dict[str, list[int]]:
    """Input names whose buffer differs at every step and is never written: name -> buffer
    index per step. (A one-step loop has no tables: nothing to gain.)"""
    if len(runs) < 2:
        return {}
    out = {}
    for name in runs[0].inputs:
        rows = [index[id(r.inputs[name])] for r in runs if name in r.inputs]
        if len(rows) == len(runs) and len(set(rows)) == len(rows) and not written & set(rows):
            out[name] = rows
    # A buffer can sit in only one table (a table row is its one home).
    used: set[int] = set()
    for name in list(out):
        if used & set(out[name]):
            del out[name]
        else:
            used.update(out[name])
    return out


def graph_key(key: tuple, runs: list[Run], shape_of: Callable[[object], tuple]) -> tuple:
    """What a captured loop is valid for: the pipeline's key (shape, guidance, sampler, steps),
    which buffer sits in which slot of which step, and every buffer's shape."""
    return key, slots(runs), tuple(tuple(shape_of(t)) for t in buffers(runs))


class GraphCache:
    """Captured loops by key, least recently used first out. `put` returns what it evicted so
    the backend can free its device memory; a value of None records a failed capture."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self.items: dict[tuple, object] = {}

    def __contains__(self, key) -> bool:
        return key in self.items

    def get(self, key):
        value = self.items.pop(key)  # re-insert: dicts keep insertion order, so last = newest
        self.items[key] = value
        return value

    def put(self, key, value) -> list:
        self.items.pop(key, None)
        self.items[key] = value
        evicted = []
        while len(self.items) > self.limit:
            oldest = next(iter(self.items))
            evicted.append(self.items.pop(oldest))
        return [v for v in evicted if v is not None]

    def clear(self) -> list:
        """Forget every loop (their addresses are stale); returns them to free."""
        out = [v for v in self.items.values() if v is not None]
        self.items.clear()
        return out


def run_loop(run_one: Callable, loop, component, runs: list[Run], on_step: Callable[[int], None]) -> None:
    """Replay a captured loop, or without one (graphs off, or a capture that failed and was
    logged) run the steps one by one; report every step either way."""
    if loop is None:
        for i, run in enumerate(runs):
            run_one(component, run)
            on_step(i)
        return
    loop.replay(runs)
    for i in range(len(runs)):
        on_step(i)
