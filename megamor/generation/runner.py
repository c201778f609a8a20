"""The model runner: each stage of the unrolled network as one call over a ragged set of items.

Stages (MOR_SPEC sections 2-5): the *prelude* (unrolled layers before the recursion, with the
embedding), one *recursion step* of the shared block (its B layers), and the *coda* (layers after
the recursion, final norm and tied output layer). An `Item` is a run of consecutive tokens of one
sequence going through the network together: one token while decoding, a chunk of the prompt
while prefilling. A stage call concatenates the rows of every item given to it into one flat
[rows, hidden] tensor, so each of the stage's matmuls runs once over all of them; attention is
per item, against that item's own pages of the paged cache (`PagedKVCache`).

One call of a recursion step may hold items at *different* depths: slot s of the block runs, for
an item at depth r, unrolled layer `step_layers[r][s]`, whose unique layer is the same for every
r with cycle / middle-cycle sharing (one matmul over all rows) and may differ with sequence
sharing (rows are grouped by unique layer, one matmul per group). Each row reads and writes the
K/V pages of its own (sequence, unrolled layer): recursion-wise caching keeps a list per
recursion step; with KV sharing, steps > 1 write nothing and read step 1's list of the same slot.

Weights and semantics are those of the exported model (`megamor.hf.modeling_mor.MoRForCausalLM`):
causal routing (expert-choice: a reached token continues when sigmoid(router logit) >= 0.5, or
its auxiliary router's; capacity-1 steps keep every reached token; token-choice: depth = argmax
of the router on H^1, plus the loss-free bias), H <- H + g f(H) for expert-choice, exit with
H^1 + g f(...) for token-choice, RoPE at the original positions, the same formulas in the same
order, so greedy generation gives the tokens of `MoRForCausalLM.generate` for each request.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from megamor.generation.paged_cache import PagedKVCache
from megamor.hf.modeling_mor import aux_logits, router_logits

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Item:
    """Tokens of one sequence travelling through the network together."""

    __slots__ = ("seq", "slot", "ids", "pos0", "t", "final", "phase", "depth", "x", "active",
                 "tok", "gate", "base", "tc_depth", "written")

    def __init__(self, seq, slot: int, ids: list[int], pos0: int, final: bool):
        self.seq, self.slot = seq, slot
        self.ids = ids
        self.pos0, self.t, self.final = pos0, len(ids), final
        self.phase = "prelude"  # prelude -> block (depth 1..N_r) -> coda
        self.depth = 0
        self.x = self.active = self.gate = self.base = self.tc_depth = None
        self.tok: np.ndarray | None = None  # token indices active at `depth`
        self.written: dict = {}  # cache column -> (entries before this item, mask of its tokens)


class ModelRunner:
    def __init__(self, model):
        """model: a `MoRForCausalLM` (fp32 or any dtype), in eval mode."""
        cfg = model.config
        core = model.model
        self.cfg = cfg
        self.embed, self.layers, self.norm = core.embed_tokens, core.layers, core.norm
        self.lm_head, self.routers = model.lm_head, core.routers
        self.dtype = self.embed.weight.dtype
        self.heads, self.groups, self.head_dim = (cfg.num_attention_heads,
                                                  cfg.num_key_value_heads, cfg.head_dim)
        steps, n = list(cfg.layer_step), cfg.num_hidden_layers
        inner = [i for i in range(n) if steps[i] > 0]
        self.num_steps = max(steps) if inner else 0
        if inner:
            a, b = inner[0], inner[-1]
            if inner != list(range(a, b + 1)) or steps[a:b + 1] != sorted(steps[a:b + 1]):
                raise ValueError("the recursion steps must be one contiguous run of layers")
        self.prelude = list(range(inner[0])) if inner else list(range(n))
        self.coda = list(range(inner[-1] + 1, n)) if inner else []
        self.step_layers = {r: [i for i in inner if steps[i] == r] for r in range(1, self.num_steps + 1)}
        sizes = {len(v) for v in self.step_layers.values()}
        if len(sizes) > 1:
            raise ValueError(f"recursion steps of different sizes: {self.step_layers}")
        self.block_size = sizes.pop() if sizes else 0
        self.routed = cfg.arch == "mor" and bool(inner)
        self.expert = self.routed and cfg.router_type == "expert_choice"
        kv_read = list(core.kv_read)
        writers = [i for i in range(n) if kv_read[i] == i]
        self.cache_layers = writers
        col = {i: j for j, i in enumerate(writers)}
        self.write_col = [col.get(i, -1) for i in range(n)]
        self.read_col = [col[kv_read[i]] for i in range(n)]
        self.unique = list(cfg.layer_unique)
        d = self.head_dim
        self.inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.cache: PagedKVCache | None = None
        # Tests: the smallest distance of a routing decision from its threshold (expert-choice:
        # |logit| of the deciding router; token-choice: top-1 minus top-2 score).
        self.record_margins, self.min_margin = False, float("inf")
        self.passes = {"decode": 0, "prefill": 0}  # token x unrolled-layer passes
        self.calls = {"prelude": 0, "block": 0, "coda": 0, "block_rows": 0}

    # ------------------------------------------------------------------ cache plan

    def new_cache(self, max_slots: int, block_size: int, max_bytes: int | None) -> PagedKVCache:
        self.cache = PagedKVCache(len(self.cache_layers), max_slots, self.cfg.max_position_embeddings,
                                  block_size, self.groups, self.head_dim, self.dtype, max_bytes)
        return self.cache

    def write_cols(self, layers) -> list[int]:
        return [self.write_col[i] for i in layers if self.write_col[i] >= 0]

    def step_cols(self, phase: str, depth: int, synchronous: bool) -> list[int]:
        """Cache columns an item may append to in the next engine step (worst case)."""
        if synchronous or not self.num_steps:
            return self.write_cols(range(self.cfg.num_hidden_layers))
        if phase == "prelude":
            return self.write_cols(self.prelude + self.step_layers[1] + self.coda)
        return self.write_cols(self.step_layers[depth] + self.coda)

    # ------------------------------------------------------------------ stages

    @torch.no_grad()
    def prelude_stage(self, items: list[Item]) -> None:
        """Embedding and prelude layers over every token of the items, then routing into step 1
        (items with no token at step 1, and every item of a vanilla model, go to the coda)."""
        self.calls["prelude"] += 1
        ids = torch.tensor([i for it in items for i in it.ids], dtype=torch.long)
        x = self.embed(ids)
        for it in items:
            it.tok = None
        x = self._run(x, items, [self.prelude] * len(items)) if self.prelude else x
        for it, xi in zip(items, x.split([it.t for it in items])):
            it.x = xi
        if not self.num_steps:
            for it in items:
                it.phase = "coda"
            return
        if self.routed and not self.expert:  # token-choice: every depth decided on H^1
            router = self.routers["1"]
            probs = torch.softmax(router_logits(x, router.weight), dim=-1)  # fp32, as trained
            score = probs + router.bias.float() if self.cfg.balancing == "loss_free" else probs
            choice = score.argmax(-1)
            if self.record_margins and score.shape[-1] > 1:
                top = score.topk(2, dim=-1).values
                self._margin((top[:, 0] - top[:, 1]).min())
            gate = (self.cfg.router_alpha * probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
                    ).to(x.dtype)
            sizes = [it.t for it in items]
            for it, g, c in zip(items, gate.split(sizes), choice.split(sizes)):
                it.gate, it.base, it.tc_depth = g, it.x, c + 1
        self._enter_step(items, 1, None)

    @torch.no_grad()
    def block_stage(self, items: list[Item]) -> None:
        """One recursion step for every item, each at its own depth, as one call of the shared
        block: rows are the items' tokens active at their depth."""
        self.calls["block"] += 1
        items.sort(key=lambda it: (it.depth, it.t > 1))
        parts = []
        for it in items:
            parts.append(it.x if it.tok is None else it.x.index_select(0, torch.from_numpy(it.tok)))
        xg = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.calls["block_rows"] += xg.shape[0]
        for s in range(self.block_size):
            xg = self._run(xg, items, [[self.step_layers[it.depth][s]] for it in items])
        sizes = [it.x.shape[0] if it.tok is None else len(it.tok) for it in items]
        nxt = []
        for it, y in zip(items, xg.split(sizes)):
            rows = None if it.tok is None else torch.from_numpy(it.tok)
            if not self.routed:  # recursive: the block's output
                new = y
            elif self.expert:  # H^{r+1} = H^r + g f(H^r), H^r the state the router scored
                g = it.gate if rows is None else it.gate.index_select(0, rows)
                base = it.x if rows is None else it.x.index_select(0, rows)
                new = base + g.unsqueeze(-1) * y
            else:  # token-choice: exit onto H^1 with the gate; before exit, carry f(...)
                g = it.gate if rows is None else it.gate.index_select(0, rows)
                d = it.tc_depth if rows is None else it.tc_depth.index_select(0, rows)
                base = it.base if rows is None else it.base.index_select(0, rows)
                g = g.unsqueeze(-1)
                cont = g * y if self.cfg.gate_every_step else y
                new = torch.where((d == it.depth).unsqueeze(-1), base + g * y, cont)
            it.x = new if rows is None else it.x.index_copy(0, rows, new)
            if it.depth == self.num_steps:
                it.phase, it.tok = "coda", None
            else:
                nxt.append(it)
        by_depth: dict[int, list[Item]] = {}
        for it in nxt:
            by_depth.setdefault(it.depth + 1, []).append(it)
        for r, group in by_depth.items():
            self._enter_step(group, r, [it.active for it in group])

    @torch.no_grad()
    def coda_stage(self, items: list[Item]) -> torch.Tensor | None:
        """Coda layers over every token of the items; then final norm and output layer on the
        last token of each final item. -> logits [final items, vocab] (None if none)."""
        self.calls["coda"] += 1
        for it in items:
            it.tok = None
        if self.coda:
            x = torch.cat([it.x for it in items]) if len(items) > 1 else items[0].x
            x = self._run(x, items, [self.coda] * len(items))
            for it, xi in zip(items, x.split([it.t for it in items])):
                it.x = xi
        last = [it.x[-1:] for it in items if it.final]
        if not last:
            return None
        h = self.norm(torch.cat(last))
        return self.lm_head(h)

    # ------------------------------------------------------------------ routing

    def _margin(self, value: torch.Tensor) -> None:
        self.min_margin = min(self.min_margin, float(value))

    def _enter_step(self, items: list[Item], step: int, reached: list | None) -> None:
        """Decide which tokens of each item run recursion step `step` (all items here are about
        to enter it); items with none go to the coda."""
        if not self.routed:
            act = [None] * len(items)
        elif self.expert:
            x = torch.cat([it.x for it in items]) if len(items) > 1 else items[0].x
            router = self.routers[str(step)]
            logit = router_logits(x, router.weight).squeeze(-1)
            gate = (self.cfg.router_alpha * torch.sigmoid(logit)).to(x.dtype)
            sizes = [it.t for it in items]
            reach = (torch.cat(reached) if len(items) > 1 else reached[0]) if reached else None
            if self.cfg.capacities[step - 1] >= 1.0:
                sel = reach if reach is not None else torch.ones_like(logit, dtype=torch.bool)
            else:
                decide = aux_logits(x, router.aux) if router.aux is not None else logit
                sel = torch.sigmoid(decide) >= 0.5
                if reach is not None:
                    sel = sel & reach
                if self.record_margins:
                    m = decide.abs() if reach is None else decide.abs()[reach]
                    if m.numel():
                        self._margin(m.min())
            for it, g in zip(items, gate.split(sizes)):
                it.gate = g
            act = list(sel.split(sizes))
        else:
            act = [it.tc_depth >= step for it in items]
        flags = [None] * len(items)
        if act[0] is not None:  # one host read for the whole set
            every = (torch.cat(act) if len(act) > 1 else act[0]).tolist()
            o = 0
            for i, it in enumerate(items):
                flags[i], o = every[o:o + it.t], o + it.t
        for it, a, f in zip(items, act, flags):
            if f is None or all(f):
                it.active, it.tok = a, None
            else:
                it.active = a
                it.tok = np.flatnonzero(np.array(f, dtype=bool))
                if len(it.tok) == 0:
                    it.phase, it.tok = "coda", None
                    continue
            it.phase, it.depth = "block", step

    # ------------------------------------------------------------------ layers

    def _run(self, x: torch.Tensor, items: list[Item], layers: list[list[int]]) -> torch.Tensor:
        """Run, for each item, its unrolled layers `layers[i]` (equal-length lists) over its rows
        of x (items' rows are consecutive in item order; `it.tok` None = all its tokens)."""
        counts = [it.t if it.tok is None else len(it.tok) for it in items]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        pos = torch.from_numpy(np.concatenate([
            np.arange(it.pos0, it.pos0 + it.t) if it.tok is None else it.pos0 + it.tok
            for it in items]))
        ang = pos.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat([ang, ang], dim=-1).unsqueeze(1)  # [rows, 1, d]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for it, c in zip(items, counts):
            self.passes["decode" if it.t == 1 else "prefill"] += c * len(layers[0])
        for j in range(len(layers[0])):
            per_item = [ls[j] for ls in layers]
            # consecutive items whose layer runs the same unique weights: one matmul over them
            runs, a = [], 0
            for b in range(1, len(items) + 1):
                if b == len(items) or self.unique[per_item[b]] != self.unique[per_item[a]]:
                    runs.append((a, b))
                    a = b
            outs = []
            for a, b in runs:
                r0, r1 = int(starts[a]), int(starts[b])
                outs.append(self._layer(x[r0:r1], items[a:b], per_item[a:b], counts[a:b],
                                        cos[r0:r1], sin[r0:r1]))
            x = outs[0] if len(outs) == 1 else torch.cat(outs)
        return x

    def _layer(self, x, items, layers, counts, cos, sin) -> torch.Tensor:
        layer = self.layers[self.unique[layers[0]]]
        att = layer.self_attn
        n = x.shape[0]
        H, G, d = self.heads, self.groups, self.head_dim
        h = layer.input_layernorm(x)
        q = _rotate(att.q_proj(h).view(n, H, d), cos, sin)
        k = _rotate(att.k_proj(h).view(n, G, d), cos, sin)
        v = att.v_proj(h).view(n, G, d)
        self._write(items, layers, counts, k, v)
        out = self._attend(items, layers, counts, q, n)
        x = x + att.o_proj(out.reshape(n, H * d))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _write(self, items, layers, counts, k, v) -> None:
        cache = self.cache
        wcol = np.array([self.write_col[l] for l in layers], np.int64)
        if (wcol < 0).all():
            return
        single = np.array([c == 1 and it.t == 1 for it, c in zip(items, counts)])
        flat, rows = [], []
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        one = np.flatnonzero(single & (wcol >= 0))
        if len(one):
            slots = np.array([items[i].slot for i in one], np.int64)
            flat.append(cache.append_one(slots, wcol[one]))
            rows.append(starts[one])
        for i, it in enumerate(items):
            if single[i] or wcol[i] < 0:
                continue
            n0 = int(cache.length[it.slot, wcol[i]])
            flat.append(cache.append(it.slot, int(wcol[i]), counts[i]))
            rows.append(np.arange(starts[i], starts[i] + counts[i]))
            it.written[int(wcol[i])] = (n0, it.tok)
        flat_t = torch.from_numpy(np.concatenate(flat))
        rows_np = np.concatenate(rows)
        if len(rows_np) == k.shape[0] and (rows_np == np.arange(len(rows_np))).all():
            cache.write(flat_t, k, v)
        else:
            r = torch.from_numpy(rows_np)
            cache.write(flat_t, k.index_select(0, r), v.index_select(0, r))

    def _attend(self, items, layers, counts, q, n) -> torch.Tensor:
        """Attention of each row over its own cache list (already holding this call's K/V)."""
        cache = self.cache
        rcol = np.array([self.read_col[l] for l in layers], np.int64)
        single = [i for i, (it, c) in enumerate(zip(items, counts)) if it.t == 1]
        out = None
        starts = np.concatenate([[0], np.cumsum(counts)])
        if single:
            slots = np.array([items[i].slot for i in single], np.int64)
            k, v, lens = cache.gather(slots, rcol[single])
            L = k.shape[2]
            mask = None
            if (lens != L).any():
                mask = (torch.arange(L).unsqueeze(0) < torch.from_numpy(lens).unsqueeze(1))[:, None, None, :]
            rows = torch.from_numpy(starts[single])
            dense = len(single) == n
            qd = q if dense else q.index_select(0, rows)
            od = self._sdpa(qd.unsqueeze(2), k, v, mask).squeeze(2)  # [m, H, d]
            if dense:
                return od
            out = q.new_zeros(q.shape).index_copy_(0, rows, od)
        if out is None:
            out = q.new_zeros(q.shape)
        for i, it in enumerate(items):
            if it.t == 1:
                continue
            r0, c = int(starts[i]), counts[i]
            k, v, lens = cache.gather(np.array([it.slot]), rcol[i:i + 1])
            n0, wmask = it.written[int(rcol[i])]
            # entries of this item in the read list: the tokens in `wmask` (None: all), in order
            rank = np.arange(it.t) if wmask is None else np.full(it.t, -1, np.int64)
            if wmask is not None:
                rank[wmask] = np.arange(len(wmask))
            toks = np.arange(it.t) if it.tok is None else it.tok
            limit = torch.from_numpy(n0 + rank[toks])  # last entry each query may see
            allowed = torch.arange(k.shape[2]).unsqueeze(0) <= limit.unsqueeze(1)  # [c, L]
            o = self._sdpa(q[r0:r0 + c].transpose(0, 1).unsqueeze(0), k, v, allowed[None, None])
            out[r0:r0 + c] = o[0].transpose(0, 1)
        return out

    def _sdpa(self, q, k, v, mask):
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  enable_gqa=self.heads != self.groups)
        rep = self.heads // self.groups
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1),
                                              v.repeat_interleave(rep, dim=1), attn_mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [rows, heads, d] (the exported model's formula)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
