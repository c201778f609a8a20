"""The unrolled network as a plan: which unique layer each unrolled layer uses, which recursion
step it belongs to, what it is expected to cost, and how the plan is cut into pipeline stages.

Pure Python (no torch) so that validation, the FLOPs model and the pipeline cut agree on one
description. Vocabulary: "unrolled layer" = a position 0..L-1 in the executed depth; "unique
layer" = a parameter set; "step" = recursion step 1..N_r (0 = outside the recursion: prelude,
coda, or every layer of a vanilla model).
"""

from __future__ import annotations

import bisect
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

    def loads(self, sizes: list[int], num_stages: int | None = None) -> list[float]:
        """Cost of each stage for a cut into pieces of `sizes` layers, in execution order: one
        piece per stage (contiguous), or num_stages x vp interleaved pieces, piece j on stage
        j mod num_stages. The first piece pays `first`, the last piece `last`."""
        num_stages = num_stages or len(sizes)
        out, start = [0.0] * num_stages, 0
        for j, s in enumerate(sizes):
            out[j % num_stages] += sum(self.layers[start:start + s])
            start += s
        out[0] += self.first
        out[(len(sizes) - 1) % num_stages] += self.last
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


def _maximal(tuples) -> list[tuple]:
    """The tuples no other one is >= componentwise (equal tuples: once)."""
    out: list = []
    # Lexicographically larger first: only those can dominate, and every kept tuple then has a
    # first coordinate >= t's, so t is dominated iff a kept tail t[1:] is >= t's. Kept tails
    # are grouped by all but their last two coordinates; within a group the last two form a
    # staircase (the second-to-last increasing, the last decreasing).
    groups: dict = {}
    for t in sorted(tuples, reverse=True):
        tail = t[1:] + (0,) * max(0, 3 - len(t))
        key, u, v = tail[:-2], tail[-2], tail[-1]
        dominated = False
        for k, (firsts, seconds) in groups.items():
            if all(a >= b for a, b in zip(k, key)):
                i = bisect.bisect_left(firsts, u)
                if i < len(firsts) and seconds[i] >= v:
                    dominated = True
                    break
        if dominated:
            continue
        out.append(t)
        firsts, seconds = groups.setdefault(key, ([], []))
        i = bisect.bisect_left(firsts, u)
        j = i
        if i < len(firsts) and firsts[i] == u:  # then seconds[i] < v: t's tail replaces it
            i += 1
        while j > 0 and seconds[j - 1] <= v:
            j -= 1
        firsts[j:i] = [u]
        seconds[j:i] = [v]
    return out


def interleaved_cut(costs: StageCosts, num_stages: int, vp: int) -> list[int]:
    """Sizes of the num_stages x vp contiguous pieces (execution order) of megatron's
    interleaved schedule minimising the largest stage load.

    Piece j runs on stage j mod P (P = num_stages) as its chunk j // P; a stage's load is the
    sum of its V = vp pieces' layer costs, plus `costs.first` on stage 0 (piece 0 holds the
    embedding) and `costs.last` on the stage of piece P*V-1 (the output layer). Piece 0 and
    piece P*V-1 hold at least one layer; a middle piece may be empty (its chunk passes its
    input on). vp == 1 is the contiguous cut (`balanced_cut`).

    Method (exact): the pieces form V rounds of P pieces; round r spans [b_r, b_{r+1}) with
    b_0 = 0, b_V = L. For fixed round boundaries b, stage p's V pieces start where stage
    p-1's end, so a cut is a path of V-tuples y^0 = (b_0..b_{V-1}) <= y^1 <= ... <= y^P =
    (b_1..b_V) (componentwise; coordinate r stays within [b_r, b_{r+1}]), stage p's load being
    sum_r cost[y^p_r, y^{p+1}_r). Whether a bound T is reachable is a forward search over
    the stages keeping only the maximal tuples reached: with non-negative costs, a tuple that
    is >= another (and still leaves the last layer to the last piece) can copy every
    continuation of the smaller one at no more cost (its pieces are sub-ranges of the other's),
    so dropping dominated tuples loses no feasible cut. A tuple whose layers left exceed what
    the later stages' budgets can take together is dropped too (it cannot finish). An
    infeasible search also returns the smallest bound at which any transition it rejected (from
    a kept tuple) or any tuple it dropped would be accepted: below that bound every stage
    reaches the same tuples, so b has no cut there either.

    Over b and T: start from the best of a few simple cuts (the contiguous cut; for V > 2 the
    optimum with one round fewer); one pass at a lower bound of the optimum (mean stage load,
    the end pieces' first/last layer) returns at once if it is reachable and otherwise gives
    each b a floor; then every b in lexicographic order of (b_1, .., b_{V-1}) whose floor allows
    it is asked whether it can match the best load so far (the first time) or beat it (after);
    if it can, its own optimum is found by bisection on T (a feasible search lowers the upper
    end to the cut's actual largest load, an infeasible one raises the lower end to the bound
    it returned) and becomes the best. Exact up to float rounding (a relative 1e-12).

    Ties (deterministic): the result is the cut of the first b in that order that reaches the
    optimum, and within it the search's first path at the optimum (frontier tuples in
    lexicographic order, each reached from the first tuple that reaches it) -- among optimal
    cuts, those with the earliest round boundaries. Cost on this 2-core machine: 1p7b (26
    unrolled layers) at PP 8 x VP 2 ~0.01 s, x VP 3 ~0.3 s; VP 4 tries O(L^3) round
    boundaries, ~20 s at PP 8 (give `parallel.pipeline_layers` to skip the search).
    """
    P, V = num_stages, vp
    layers = [float(c) for c in costs.layers]
    L = len(layers)
    if not isinstance(P, int) or not isinstance(V, int) or P < 1 or V < 1:
        raise ValueError(f"interleaved_cut: num_stages={P!r} and vp={V!r} must be integers >= 1")
    if any(c < 0 for c in layers) or costs.first < 0 or costs.last < 0:
        raise ValueError("interleaved_cut: layer costs must be >= 0")
    if V == 1:
        return balanced_cut(costs, P)
    if L < 2:
        raise ValueError(f"cannot cut {L} layer(s) into {P} x {V} interleaved pieces: the first "
                         f"and the last piece need a layer each")
    prefix = [0.0]
    for c in layers:
        prefix.append(prefix[-1] + c)
    extra = [0.0] * P
    extra[0] += costs.first
    extra[P - 1] += costs.last

    def boundaries():
        def rec(prev: int, left: int):
            if left == 0:
                yield ()
                return
            for b in range(prev, L):
                for rest in rec(b, left - 1):
                    yield (b,) + rest
        yield from rec(1, V - 1)  # b_1 >= 1 (piece 0 needs a layer), b_{V-1} <= L-1

    inf = float("inf")

    def search(T: float, b: tuple):
        """Forward search over the stages for round boundaries b at bound T. Returns
        (sizes, None) if a cut exists, else (None, the smallest bound that would accept a
        transition rejected here)."""
        bounds = (0,) + b + (L,)
        caps = list(bounds[1:])
        caps[-1] = L - 1  # the last piece keeps layer L-1
        end = bounds[1:]
        next_event = inf
        frontier = {bounds[:-1]: None}
        parents = []
        for p in range(P):
            budget = T - extra[p]
            if p == P - 1:  # the last stage must land exactly on the round ends
                best = None
                for y in frontier:
                    if y[-1] >= L:
                        continue
                    c = sum(prefix[e] - prefix[a] for a, e in zip(y, end))
                    if c <= budget and best is None:
                        best = y
                    elif c > budget:
                        next_event = min(next_event, c + extra[p])
                if best is None:
                    return None, next_event
                parents.append(frontier)
                path = [end, best]
                for par in reversed(parents[1:]):
                    path.append(par[path[-1]])
                path = path[::-1]  # y^0 .. y^P
                sizes = [path[q + 1][r] - path[q][r] for r in range(V) for q in range(P)]
                return sizes, None
            new: dict = {}
            if budget < 0:
                return None, min(next_event, extra[p])
            for y in frontier:
                # every z >= y within the budget, coordinate by coordinate; the last coordinate
                # as far as the budget left reaches (what stops short is a rejected transition)
                heads = [((), 0.0)]
                for r in range(V):
                    a, cap, base = y[r], caps[r], prefix[y[r]]
                    grown = []
                    for head, spent in heads:
                        top = bisect.bisect_right(prefix, base + budget - spent, a, cap + 1) - 1
                        if top < cap:
                            next_event = min(next_event, spent + prefix[top + 1] - base + extra[p])
                        if r == V - 1:
                            grown.append((head + (max(a, top),), 0.0))
                        else:
                            grown.extend((head + (z,), spent + prefix[z] - base)
                                         for z in range(a, max(a, top) + 1))
                    heads = grown
                for t, _ in heads:
                    if (p > 0 or t[0] >= 1) and t not in new:
                        new[t] = y
            # what is left must fit in the later stages' budgets
            room = (P - 1 - p) * T - sum(extra[p + 1:])
            kept = []
            for t in _maximal(new):
                left = sum(prefix[e] for e in end) - sum(prefix[x] for x in t)
                if left <= room:
                    kept.append(t)
                else:
                    next_event = min(next_event, (left + sum(extra[p + 1:])) / (P - 1 - p))
            if not kept:
                return None, next_event
            parents.append(frontier)
            frontier = {t: new[t] for t in sorted(kept)}
        raise AssertionError("unreachable")

    def worst(sizes):
        return max(costs.loads(sizes, P))

    total = prefix[-1] + costs.first + costs.last
    tol = 1e-12 * max(total, 1e-300)
    lo = max(total / P, layers[0] + costs.first, layers[-1] + costs.last)
    # A first cut: all but the last layer in piece 0; or the contiguous cut in round 0's first
    # P-1 pieces and the last piece, the pieces between empty; or the best cut with one round
    # fewer, its second-to-last round empty.
    best = [L - 1] + [0] * (P * V - 2) + [1]
    if L >= P > 1:
        contiguous = balanced_cut(costs, P)
        other = contiguous[:-1] + [0] * (P * V - P) + contiguous[-1:]
        if worst(other) < worst(best):
            best = other
    if V > 2:
        fewer = interleaved_cut(costs, P, V - 1)
        other = fewer[:-P] + [0] * P + fewer[-P:]
        if worst(other) < worst(best):
            best = other
    hi = worst(best)
    # One pass at the lower bound (cheap: a tight bound ends most searches early) gives each b
    # a bound below which it has no cut.
    known = {}
    for b in boundaries():
        sizes, known[b] = search(lo, b)
        if sizes is not None:
            return sizes  # the lower bound is reached: the first b in order
    # Then each b in order: can it do at least as well as the best so far (strictly better once
    # some b holds the best)? If so, its own optimum by bisection on T.
    winner = None
    for b, floor in known.items():
        bound = hi + tol if winner is None else hi - tol
        if floor > bound:
            continue
        sizes, event = search(bound, b)
        if sizes is None:
            continue
        winner, best, hi = b, sizes, worst(sizes)
        low = max(lo, floor)
        while hi - low > tol:
            mid = (low + hi) / 2
            sizes, event = search(mid, b)
            if sizes is not None:
                best, hi = sizes, worst(sizes)
            else:
                low = max(event, mid)
    # the winner's first cut at the optimum (the tie rule)
    sizes, _ = search(hi + tol, winner)
    return sizes if sizes is not None and worst(sizes) <= hi + tol else best


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
