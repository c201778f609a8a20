"""The unrolled network as a plan: which unique layer each unrolled layer uses, which recursion
step it belongs to, what it is expected to cost, and how the plan is cut into pipeline stages.

Pure Python (no torch) so that validation, the FLOPs model and the pipeline cut agree on one
description. Vocabulary: "unrolled layer" = a position 0..L-1 in the executed depth; "unique
layer" = a parameter set; "step" = recursion step 1..N_r (0 = outside the recursion: prelude,
coda, or every layer of a vanilla model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnrolledLayer:
    index: int  # position in the unrolled network
    unique: int  # index of the parameter set it runs
    step: int  # recursion step 1..N_r, 0 outside the recursion
    slot: int  # position inside its step's segment (0..B-1); KV sharing reuses step 1's slot
    first_in_step: bool
    last_in_step: bool
    cost: float  # expected fraction of the sequence it processes


@dataclass(frozen=True)
class Plan:
    layers: tuple[UnrolledLayer, ...]
    num_unique: int
    num_recursions: int
    block_size: int  # B, layers per recursion step (0 for vanilla)

    def unique_layers_in(self, start: int, stop: int) -> list[int]:
        return sorted({l.unique for l in self.layers[start:stop]})


def build_plan(arch: str, num_layers: int, num_recursions: int, sharing: str,
               capacities: list[float] | None = None) -> Plan:
    """Map the unrolled depth onto unique layers (MOR_SPEC.md section 2)."""
    L = num_layers
    if arch == "vanilla":
        layers = tuple(UnrolledLayer(i, i, 0, 0, False, False, 1.0) for i in range(L))
        return Plan(layers, L, 1, 0)
    nr = num_recursions
    middle = sharing.startswith("middle")
    inner = L - 2 if middle else L
    B = inner // nr
    caps = capacities if (arch == "mor" and capacities is not None) else [1.0] * nr
    out = []
    for i in range(L):
        if middle and i == 0:
            out.append(UnrolledLayer(i, 0, 0, 0, False, False, 1.0))
            continue
        if middle and i == L - 1:
            out.append(UnrolledLayer(i, B + 1, 0, 0, False, False, 1.0))
            continue
        m = i - 1 if middle else i  # position inside the recursive part
        step = m // B + 1
        slot = m % B
        if sharing.endswith("cycle"):
            u = m % B
        else:  # sequence: each unique layer repeated N_r times in a row
            u = m // nr
        if middle:
            u += 1
        out.append(UnrolledLayer(i, u, step, slot, slot == 0, slot == B - 1, caps[step - 1]))
    num_unique = B + 2 if middle else B
    return Plan(tuple(out), num_unique, nr, B)


@dataclass(frozen=True)
class StageCosts:
    """What the pieces of the unrolled network cost a pipeline stage (any unit; built from the
    FLOPs model by `megamor.flops.pipeline_costs`): one entry per unrolled layer, plus what only
    the first stage (embedding) and only the last stage (final norm, output layer, loss) do."""

    layers: tuple[float, ...]
    first: float = 0.0
    last: float = 0.0

    def loads(self, sizes: list[int]) -> list[float]:
        """Cost of each stage for a cut of `sizes` layers per stage."""
        out, start = [], 0
        for p, s in enumerate(sizes):
            out.append(sum(self.layers[start:start + s]) + (self.first if p == 0 else 0.0)
                       + (self.last if p == len(sizes) - 1 else 0.0))
            start += s
        return out


def useful_fraction(loads: list[float]) -> float:
    """Mean over max stage load: the fraction of the pipeline's time its stages compute in the
    steady state (1F1B runs at the pace of the slowest stage; the fill/drain bubble is apart)."""
    return sum(loads) / (len(loads) * max(loads))


def balanced_cut(costs, num_stages: int, first: float = 0.0, last: float = 0.0) -> list[int]:
    """Split the layers into `num_stages` contiguous non-empty parts minimising the largest
    stage load, the first stage also paying `first` and the last `last`.

    `costs`: a list of per-layer costs, or a `StageCosts` (whose `first`/`last` are then used).
    Returns the number of layers per stage. Exact dynamic programme (L and P are small); ties go
    to the cut that puts more layers early, so the result is deterministic.
    """
    if isinstance(costs, StageCosts):
        costs, first, last = list(costs.layers), costs.first, costs.last
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {num_stages} non-empty pipeline stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[p][i]: minimal max-stage-cost for the first i layers in p stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    arg = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    tol = 1e-12 * max(1.0, prefix[-1] + first + last)
    for p in range(1, num_stages + 1):
        for i in range(p, n + 1):
            if p == num_stages and i != n:
                continue
            for j in range(i - 1, p - 2, -1):
                load = prefix[i] - prefix[j] + (first if p == 1 else 0.0) \
                    + (last if p == num_stages else 0.0)
                v = max(best[p - 1][j], load)
                if v < best[p][i] - tol:
                    best[p][i], arg[p][i] = v, j
    sizes = []
    i = n
    for p in range(num_stages, 0, -1):
        j = arg[p][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def stage_ranges(plan: Plan, num_stages: int, sizes: list[int] | None = None,
                 costs: StageCosts | None = None) -> list[tuple[int, int]]:
    """[start, stop) of each stage's unrolled layers: the explicit `sizes`
    (`parallel.pipeline_layers`) if given, else the cut of `costs` minimising the slowest stage."""
    if sizes is None:
        if num_stages == 1:
            sizes = [len(plan.layers)]
        elif costs is None:
            raise ValueError("stage_ranges needs the stage costs (megamor.flops.pipeline_costs) "
                             "or explicit sizes to cut a pipeline")
        else:
            sizes = balanced_cut(costs, num_stages)
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def stage_pieces(plan: Plan, num_stages: int, vp: int = 1, sizes: list[int] | None = None,
                 costs: StageCosts | None = None) -> list[list[tuple[int, int]]]:
    """Each stage's model chunks as [start, stop) ranges of unrolled layers, in chunk order.

    vp == 1: one chunk per stage (`stage_ranges`). vp > 1 (megatron's interleaved schedule):
    the unrolled network cut into num_stages x vp contiguous pieces, piece j running on stage
    j mod num_stages as its chunk j // num_stages, so a micro-batch visits every stage vp times.
    `sizes`: the pieces' lengths in execution order (`parallel.pipeline_layers`; a middle piece
    may be empty: that chunk passes its input on), else the cut of `costs` minimising the
    slowest stage (`interleaved_cut`)."""
    if vp == 1:
        return [[r] for r in stage_ranges(plan, num_stages, sizes, costs)]
    if sizes is None:
        if costs is None:
            raise ValueError("stage_pieces needs the stage costs (megamor.flops.pipeline_costs) "
                             "or explicit sizes to cut a pipeline")
        sizes = interleaved_cut(costs, num_stages, vp)
    if len(sizes) != num_stages * vp or sum(sizes) != len(plan.layers):
        raise ValueError(f"{len(sizes)} piece sizes summing to {sum(sizes)} for {num_stages} x "
                         f"{vp} chunks over {len(plan.layers)} unrolled layers")
    out: list[list[tuple[int, int]]] = [[] for _ in range(num_stages)]
    start = 0
    for j, s in enumerate(sizes):
        out[j % num_stages].append((start, start + s))
        start += s
    return out


def unique_layers_of(plan: Plan, pieces: list[tuple[int, int]]) -> list[int]:
    """The unique layers a stage runs in any of its chunks (it holds each once)."""
    return sorted({u for a, b in pieces for u in plan.unique_layers_in(a, b)})


def circular_loads(plan: Plan, costs: StageCosts, num_stages: int) -> list[float] | None:
    """Stage loads of the circular cut (PIPELINE_NOTES option B; not implemented in training):
    the shared block's unique layers sliced contiguously over the stages, every recursion passing
    through all of them; prelude + embedding on the first stage, coda + output on the last. The
    slices are chosen to minimise the slowest stage. None where the block has fewer unique layers
    than stages, or for vanilla models."""
    block = [l for l in plan.layers if l.step >= 1]
    if not block:
        return None
    uniques = sorted({l.unique for l in block})
    if len(uniques) < num_stages:
        return None
    per_unique = [sum(costs.layers[l.index] for l in block if l.unique == u) for u in uniques]
    first = costs.first + sum(costs.layers[l.index] for l in plan.layers
                              if l.step == 0 and l.index < block[0].index)
    last = costs.last + sum(costs.layers[l.index] for l in plan.layers
                            if l.step == 0 and l.index > block[-1].index)
    sizes = balanced_cut(per_unique, num_stages, first, last)
    return StageCosts(tuple(per_unique), first, last).loads(sizes)


def copy_index(plan: Plan, pieces: list[list[tuple[int, int]]], stage: int) -> dict[int, int]:
    """For each unique layer on `stage` (`pieces`: every stage's chunk ranges, `stage_pieces`):
    how many earlier stages also hold a copy of it.

    0 marks the owning copy (saved in checkpoints, counted in the gradient norm); the others are
    replicas of it. A stage's chunks share one copy of a layer.
    """
    held = [set(unique_layers_of(plan, p)) for p in pieces]
    return {u: sum(1 for p in range(stage) if u in held[p]) for u in sorted(held[stage])}
