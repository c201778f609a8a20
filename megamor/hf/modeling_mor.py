"""Mixture-of-Recursions causal LM for transformers, with recursion-wise KV caching.

Shipped inside every MoR / recursive export of megamor (`megamor convert to-hf`), loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; imports only torch and
transformers. It computes what megamor's megatron model computes in eval mode (MOR_SPEC.md):

- the unrolled network runs unique layers in the order of `config.layer_unique`; `layer_step`
  gives each unrolled layer's recursion step (0 = prelude / coda / vanilla layer);
- routing is causal (no look-ahead): expert-choice continues a token to step r when the step's
  router (or its auxiliary router) gives sigmoid(logit) >= 0.5, among the tokens that reached
  step r-1 (a step of capacity 1 keeps them all); token-choice picks each token's depth from its
  hidden state after the first layer. Selected tokens are updated H <- H + g * f(H)
  (expert-choice) or exit with H^1 + g * f(...) (token-choice);
- each step runs only on the tokens that reached it: they are gathered (sequences with no
  active token are dropped from the batch), attend causally among the tokens active at that
  step, with RoPE at their original positions;
- recursion-wise KV cache: every unrolled layer caches K/V of only the tokens it processed, and
  its queries see only those entries; with recursive KV sharing the layers of steps > 1 cache
  nothing and read the K/V of step 1's layer in the same slot (all tokens).

Without a cache (use_cache=False) the same code runs with a throw-away cache, so cached decoding
and full recomputation follow one definition. Decoding (one new column) takes a fast path with
the same result: active tokens are row selections, K/V are written in place into preallocated
buffers, and attention reads the whole batch's cache where it lies (tests/test_decode.py). Padding (attention_mask == 0, left or right) is
never processed and never cached; positions count real tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, rotate_half

from .configuration_mor import MoRConfig

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) \
    else "past_key_values"


# ----------------------------------------------------------------------------- cache


class RecursionKVCache:
    """Per unrolled layer: K/V of the tokens that layer processed, with their positions.

    k[l], v[l]: [batch, kv_heads, capacity, head_dim] (the layout SDPA reads without a copy);
    pos[l]: [batch, capacity] original positions; length[l]: [batch] valid entries per sequence.
    Sequences grow independently (a token skipped by a recursion step adds nothing there).
    Buffers grow geometrically; bound[l] is max(length[l]) kept on the host (read back only
    when a step appends to part of the batch), and uniform[l] says every sequence holds exactly
    bound[l] entries (no key mask needed). Layers that read another layer's K/V
    (recursive KV sharing) own no entries.
    """

    def __init__(self, num_layers: int):
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers
        self.pos: list = [None] * num_layers
        self.length: list = [None] * num_layers
        self.bound = [0] * num_layers
        self.uniform = [True] * num_layers
        self.seen = 0  # columns of input already consumed (including padding)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def _reserve(self, layer: int, batch: int, k: torch.Tensor, pos: torch.Tensor, need: int) -> None:
        if self.k[layer] is None:
            g, d = k.shape[-2], k.shape[-1]
            self.k[layer] = k.new_zeros(batch, g, 0, d)
            self.v[layer] = k.new_zeros(batch, g, 0, d)
            self.pos[layer] = pos.new_zeros(batch, 0)
            self.length[layer] = pos.new_zeros(batch)
        cap = self.pos[layer].shape[1]
        if need > cap:
            new = max(need, cap + max(16, cap // 2))  # geometric (x1.5)
            self.k[layer] = self._grow(self.k[layer], 2, new)
            self.v[layer] = self._grow(self.v[layer], 2, new)
            self.pos[layer] = self._grow(self.pos[layer], 1, new)

    def append(self, layer: int, batch: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               pos: torch.Tensor, valid: torch.Tensor, whole: bool) -> None:
        """Several tokens per sequence (prefill). rows [m]: batch rows of the gathered sequences;
        k, v [m, t, G, d]; pos, valid [m, t]; whole: every row, every token valid."""
        self._reserve(layer, batch, k, pos, 0)
        start = self.length[layer][rows]  # [m]
        added = valid.sum(1)
        need = int((start + added).max())
        self._reserve(layer, batch, k, pos, need)
        slot = start.unsqueeze(1) + valid.long().cumsum(1) - 1
        r = rows.unsqueeze(1).expand_as(slot)[valid]
        c = slot[valid]
        self.k[layer][r, :, c] = k[valid]
        self.v[layer][r, :, c] = v[valid]
        self.pos[layer][r, c] = pos[valid]
        self.length[layer][rows] = start + added
        self.bound[layer] = max(self.bound[layer], need)
        self.uniform[layer] = self.uniform[layer] and whole

    def append_one(self, layer: int, batch: int, rows: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, pos: torch.Tensor) -> None:
        """One new token for each of the sequences `rows` [m] (decoding): k, v [m, G, d];
        pos [m]."""
        self._reserve(layer, batch, k, pos, self.bound[layer] + 1)
        whole = rows.numel() == batch
        length = self.length[layer]
        start = length if whole else length.index_select(0, rows)
        # flat index_copy_ (an index_put over [rows, :, start] costs several times more)
        kb, vb, pb = self.k[layer], self.v[layer], self.pos[layer]
        g, cap, d = kb.shape[1], kb.shape[2], kb.shape[3]
        slot = rows * cap + start  # [m] flat (row, position)
        heads = (rows.unsqueeze(1) * g + torch.arange(g, device=rows.device)) * cap  # [m, G]
        flat = (heads + start.unsqueeze(1)).reshape(-1)
        kb.view(-1, d).index_copy_(0, flat, k.reshape(-1, d))
        vb.view(-1, d).index_copy_(0, flat, v.reshape(-1, d))
        pb.view(-1).index_copy_(0, slot, pos)
        if whole:
            length += 1
            self.bound[layer] += 1
        else:  # exact bound (one host read): a deep layer's rows lag behind the step count
            length.index_add_(0, rows, torch.ones_like(rows))
            if rows.numel():
                self.bound[layer] = max(self.bound[layer], int(start.max()) + 1)
        self.uniform[layer] = self.uniform[layer] and whole

    @staticmethod
    def _grow(t: torch.Tensor, dim: int, cap: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = cap
        out = t.new_zeros(shape)
        out.narrow(dim, 0, t.shape[dim]).copy_(t)
        return out

    def entries(self, layer: int, rows: torch.Tensor):
        """-> K, V [m, G, n, d], positions [m, n], valid [m, n] for the given batch rows
        (views, no copy, when the rows are the whole batch)."""
        whole = rows.numel() == self.k[layer].shape[0]
        length = self.length[layer] if whole else self.length[layer][rows]
        n = int(length.max())
        valid = torch.arange(n, device=length.device).unsqueeze(0) < length.unsqueeze(1)
        if whole:
            return self.k[layer][:, :, :n], self.v[layer][:, :, :n], self.pos[layer][:, :n], valid
        return (self.k[layer][rows, :, :n], self.v[layer][rows, :, :n], self.pos[layer][rows, :n],
                valid)

    def all_entries(self, layer: int):
        """Decoding: K, V [batch, G, n, d] of every sequence (views, n = bound) and the key mask
        [batch, 1, 1, n] (None when every sequence holds n entries). A sequence with no entry
        gets its zero-filled first slot, so its (discarded) output is finite."""
        n = self.bound[layer]
        k, v = self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        if self.uniform[layer]:
            return k, v, None
        length = self.length[layer].clamp(min=1)
        mask = torch.arange(n, device=length.device).unsqueeze(0) < length.unsqueeze(1)
        return k, v, mask[:, None, None, :]

    def num_entries(self) -> int:
        """K/V entries stored (tokens x layers, summed over the batch)."""
        return int(sum(int(l.sum()) for l in self.length if l is not None))

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of K and V: of the stored entries, or of the allocated buffers."""
        total = 0
        for k, length in zip(self.k, self.length):
            if k is None:
                continue
            per_entry = 2 * k.shape[1] * k.shape[3] * k.element_size()
            total += per_entry * (k.shape[0] * k.shape[2] if allocated else int(length.sum()))
        return total

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for store in (self.k, self.v, self.pos, self.length):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))


# ----------------------------------------------------------------------------- active tokens


class ActiveTokens:
    """The tokens a layer processes, gathered per sequence in causal order.

    rows [m]: batch rows with at least one active token (the others are skipped entirely);
    idx [m, t]: their columns (padding slots point at column 0); valid [m, t]. single: one
    column (decoding), where gathering and scattering are plain row selections.
    """

    def __init__(self, mask: torch.Tensor):
        self.shape = mask.shape
        self.single = mask.shape[1] == 1
        if self.single:
            self.rows = mask[:, 0].nonzero().squeeze(1)
            self.m = int(self.rows.numel())
            self.all = self.m == mask.shape[0]
            self.idx = self.rows.new_zeros(self.m, 1)
            self.valid = torch.ones(self.m, 1, dtype=torch.bool, device=mask.device)
            return
        counts = mask.sum(1)
        self.rows = counts.nonzero().squeeze(1)
        self.m = int(self.rows.numel())
        self.all = False
        if self.m == 0:
            return
        sub, c = mask[self.rows], counts[self.rows]
        t = int(c.max())
        q = mask.shape[1]
        cols = torch.arange(q, device=mask.device).expand_as(sub)
        order = torch.where(sub, cols, cols + q).argsort(dim=1)[:, :t]
        self.valid = torch.arange(t, device=mask.device).unsqueeze(0) < c.unsqueeze(1)
        self.idx = torch.where(self.valid, order, torch.zeros_like(order))
        self.all = self.m == mask.shape[0] and t == q and bool(self.valid.all())

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.all:
            return x
        if self.single:
            return x.index_select(0, self.rows)
        return x[self.rows.unsqueeze(1), self.idx]

    def scatter(self, base: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """base [b, q, ...] with the active entries replaced by y [m, t, ...] (out of place)."""
        if self.all:
            return y
        if self.single:
            return base.index_copy(0, self.rows, y)
        out = base.clone()
        r = self.rows.unsqueeze(1).expand_as(self.idx)[self.valid]
        out[r, self.idx[self.valid]] = y[self.valid]
        return out


# ----------------------------------------------------------------------------- layers


class MoRRMSNorm(nn.Module):
    """RMSNorm as the trained model computed it (torch's `rms_norm`, megatron's local norm).
    transformers' `LlamaRMSNorm` is bit-identical in fp32 but rounds differently in bf16 (the
    normalised input, then the product): with it a trained bf16 export drifted past the 2% bound
    of tests/test_hf_export.py's bf16 test (2.05% mean |logit| difference to fp32)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Positions:
    """Original positions of a gathered token set [m, t] and their RoPE angles, computed once
    and shared by every layer that processes the set."""

    def __init__(self, pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        self.pos = pos
        ang = pos.to(torch.float32).unsqueeze(-1) * inv_freq
        emb = torch.cat([ang, ang], dim=-1).unsqueeze(2)  # [m, t, 1, d]
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE of x [m, t, heads, d] (Llama's)."""
        return x * self.cos + rotate_half(x) * self.sin


class MoRAttention(nn.Module):
    def __init__(self, config: MoRConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.groups * d, bias=False)
        self.v_proj = nn.Linear(h, self.groups * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)

    def forward(self, x, tokens: ActiveTokens, pos: Positions, cache: RecursionKVCache,
                write: int | None, read: int):
        """x [m, t, h] gathered tokens at positions pos. Writes this layer's K/V into
        cache slot `write` (None: computes no K/V) and attends to the entries of slot `read`."""
        m, t, _ = x.shape
        q = pos.rotate(self.q_proj(x).view(m, t, self.heads, self.head_dim)).transpose(1, 2)
        if write is not None:
            k = pos.rotate(self.k_proj(x).view(m, t, self.groups, self.head_dim))
            v = self.v_proj(x).view(m, t, self.groups, self.head_dim)
            if tokens.single:
                cache.append_one(write, tokens.shape[0], tokens.rows, k[:, 0], v[:, 0], pos.pos[:, 0])
            else:
                cache.append(write, tokens.shape[0], tokens.rows, k, v, pos.pos, tokens.valid,
                             tokens.all)
        if tokens.single:
            out = self._decode_attention(q, tokens, cache, read)
        else:
            k, v, kpos, kvalid = cache.entries(read, tokens.rows)  # [m, G, n, d]
            allowed = kvalid.unsqueeze(1) & (kpos.unsqueeze(1) <= pos.pos.unsqueeze(2))  # [m, t, n]
            allowed = (allowed | ~tokens.valid.unsqueeze(2)).unsqueeze(1)  # padding queries: any
            out = self._sdpa(q, k, v, allowed)
        return self.o_proj(out.transpose(1, 2).reshape(m, t, self.heads * self.head_dim))

    def _decode_attention(self, q, tokens: ActiveTokens, cache: RecursionKVCache, read: int):
        """One new token per active sequence, q [m, heads, 1, d]; every cached entry precedes it.
        The attention runs over the whole batch's cache in place (no gather of K/V rows, which
        would copy more than the attention reads); the inactive rows' queries are zeros and
        their outputs are dropped."""
        k, v, mask = cache.all_entries(read)
        if tokens.all:
            return self._sdpa(q, k, v, mask)
        full = q.new_zeros((tokens.shape[0],) + tuple(q.shape[1:])).index_copy_(0, tokens.rows, q)
        return self._sdpa(full, k, v, mask).index_select(0, tokens.rows)

    def _sdpa(self, q, k, v, mask):
        """q [m, heads, t, d]; k, v [m, G, n, d]; mask broadcastable to [m, 1, t, n] or None."""
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  enable_gqa=self.heads != self.groups)
        rep = self.heads // self.groups  # torch < 2.5: repeat each K/V head for its query heads
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1),
                                              v.repeat_interleave(rep, dim=1), attn_mask=mask)


class MoRDecoderLayer(nn.Module):
    """Pre-norm Llama layer (transformers' SwiGLU MLP, MoR's attention); f(H) includes the
    residual connections."""

    def __init__(self, config: MoRConfig):
        super().__init__()
        self.input_layernorm = MoRRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoRAttention(config)
        self.post_attention_layernorm = MoRRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, tokens, pos, cache, write, read):
        x = x + self.self_attn(self.input_layernorm(x), tokens, pos, cache, write, read)
        return x + self.mlp(self.post_attention_layernorm(x))


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Routers compute in fp32 whatever the model's dtype, as in training (their weights stay
    fp32 in a bf16 export: `_keep_in_fp32_modules_strict`): x [..., h] @ weight^T in fp32."""
    return x.float() @ weight.float().t()


def aux_logits(x: torch.Tensor, aux: nn.Module) -> torch.Tensor:
    """The auxiliary router's logit (fp32), on the states cast to its weights' dtype."""
    return aux(x.to(aux[0].weight.dtype)).squeeze(-1).float()


class ExpertChoiceRouter(nn.Module):
    def __init__(self, hidden_size: int, aux_router: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size))
        self.aux = None
        if aux_router:
            self.aux = nn.Sequential(nn.Linear(hidden_size, hidden_size // 2, bias=False), nn.SiLU(),
                                     nn.Linear(hidden_size // 2, 1, bias=False))


class TokenChoiceRouter(nn.Module):
    def __init__(self, hidden_size: int, num_recursions: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_recursions, hidden_size))
        self.register_buffer("bias", torch.zeros(num_recursions))  # loss-free balancing bias


# ----------------------------------------------------------------------------- models


class MoRPreTrainedModel(PreTrainedModel):
    config_class = MoRConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoRDecoderLayer"]
    # Routers compute in fp32 in training (megamor.model.routing); a bf16/fp16 model keeps them.
    _keep_in_fp32_modules_strict = ["routers"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, MoRRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, (ExpertChoiceRouter, TokenChoiceRouter)):
            nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, TokenChoiceRouter):
                module.bias.zero_()


class MoRModel(MoRPreTrainedModel):
    def __init__(self, config: MoRConfig):
        super().__init__(config)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.layers = nn.ModuleList(MoRDecoderLayer(config) for _ in range(config.num_unique_layers))
        self.norm = MoRRMSNorm(h, config.rms_norm_eps)
        self.routed = config.arch == "mor"
        self.routers = nn.ModuleDict()
        if self.routed and config.router_type == "expert_choice":
            for r in range(1, config.num_recursions + 1):
                self.routers[str(r)] = ExpertChoiceRouter(h, config.causal_routing == "aux_router")
        elif self.routed:
            self.routers["1"] = TokenChoiceRouter(h, config.num_recursions)
        # K/V slot each unrolled layer reads: its own, or (KV sharing) step 1's in the same slot.
        steps, slots = config.layer_step, config.layer_slot
        self.kv_read = list(range(config.num_hidden_layers))
        if config.kv_sharing:
            first = {slots[i]: i for i in range(config.num_hidden_layers) if steps[i] == 1}
            for i in range(config.num_hidden_layers):
                if steps[i] > 1:
                    self.kv_read[i] = first[slots[i]]
        self.post_init()

    def _step_bounds(self, i: int) -> tuple[bool, bool]:
        steps, n = self.config.layer_step, self.config.num_hidden_layers
        s = steps[i]
        return (s > 0 and (i == 0 or steps[i - 1] != s)), (s > 0 and (i == n - 1 or steps[i + 1] != s))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, routing_trace: dict | None = None):
        cfg = self.config
        b, q = input_ids.shape
        past = cache.seen if cache is not None else 0
        if attention_mask is not None:
            am = attention_mask.to(torch.bool)
            if am.shape != (b, past + q):
                raise ValueError(f"attention_mask has shape {tuple(am.shape)}, expected "
                                 f"{(b, past + q)} (cached {past} + new {q} tokens)")
            real = am[:, past:]
            if position_ids is None:
                position_ids = (am.long().cumsum(1) - 1).clamp(min=0)[:, past:]
        else:
            real = torch.ones(b, q, dtype=torch.bool, device=input_ids.device)
            if position_ids is None:
                position_ids = torch.arange(past, past + q, device=input_ids.device).expand(b, q)
        kv = cache if cache is not None else RecursionKVCache(cfg.num_hidden_layers)

        x = self.embed_tokens(input_ids)
        d = cfg.head_dim  # RoPE frequencies, once per forward
        inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                           device=x.device) / d))
        everyone = ActiveTokens(real)
        cur = xg = cur_pos = None  # the gathered token set being processed, its activations
        reached = real  # expert-choice: survivors of the previous step
        depth = gate = base = None

        def flush():
            return cur.scatter(x, xg) if cur is not None and cur.m else x

        for i in range(cfg.num_hidden_layers):
            step = cfg.layer_step[i]
            first, last = self._step_bounds(i)
            regather = False
            if self.routed and first:
                x = flush()
                active, gate, base, depth, reached = self._route(x, step, real, reached, depth, gate, base)
                if routing_trace is not None:
                    routing_trace[step] = active
                cur, regather = ActiveTokens(active), True
            elif not (self.routed and step > 0) and cur is not everyone:
                x = flush()
                cur, regather = everyone, True
            if regather and cur.m:
                xg = cur.gather(x)
                cur_pos = Positions(cur.gather(position_ids), inv_freq, x.dtype)
            if cur.m:
                write = i if self.kv_read[i] == i else None
                xg = self.layers[cfg.layer_unique[i]](xg, cur, cur_pos, kv, write, self.kv_read[i])
            if self.routed and last:
                if cur.m:
                    x = self._update(x, xg, cur, step, gate, base, depth)
                cur = xg = None
        x = flush()
        kv.seen = past + q
        return self.norm(x), (kv if use_cache else None)

    def _route(self, x, step, real, reached, depth, gate, base):
        """Causal routing at the start of `step`. Returns (active mask [b, q], gate, base, depth,
        reached for the next step)."""
        cfg = self.config
        if cfg.router_type == "expert_choice":
            router = self.routers[str(step)]
            logit = router_logits(x, router.weight).squeeze(-1)
            gate = (cfg.router_alpha * torch.sigmoid(logit)).to(x.dtype)
            if cfg.capacities[step - 1] >= 1.0:
                selected = reached
            else:
                decide = aux_logits(x, router.aux) if router.aux is not None else logit
                selected = reached & (torch.sigmoid(decide) >= 0.5)
            return selected, gate, x, None, selected
        if step == 1:
            router = self.routers["1"]
            probs = torch.softmax(router_logits(x, router.weight), dim=-1)
            score = probs + router.bias.float() if cfg.balancing == "loss_free" else probs
            choice = score.argmax(-1)
            gate = (cfg.router_alpha * probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)).to(x.dtype)
            depth, base = choice + 1, x
        return real & (depth >= step), gate, base, depth, reached

    def _update(self, x, y, tokens, step, gate, base, depth):
        """End of a recursion step for the gathered tokens (outputs y)."""
        g = tokens.gather(gate.unsqueeze(-1))
        base_g = tokens.gather(base)
        if self.config.router_type == "expert_choice":
            return tokens.scatter(x, base_g + g * y)
        d = tokens.gather(depth.unsqueeze(-1))
        cont = g * y if self.config.gate_every_step else y
        return tokens.scatter(x, torch.where(d == step, base_g + g * y, cont))


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        self.model = MoRModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own RecursionKVCache

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, use_cache=None, labels=None, logits_to_keep: int = 0,
                routing_trace: dict | None = None, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, RecursionKVCache):
            if cache.get_seq_length() != 0:
                raise ValueError("MoR models need their own RecursionKVCache; got a filled "
                                 f"{type(cache).__name__}")
            cache = None  # an empty generic cache built by generate(): use our own
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = RecursionKVCache(self.config.num_hidden_layers)
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, use_cache,
                                   routing_trace)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None,
                                      attention_mask=None, use_cache=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, RecursionKVCache) and cache.seen:
            input_ids = input_ids[:, cache.seen:]
        else:
            cache = None
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache,
               "use_cache": use_cache}
        if "logits_to_keep" in kwargs:
            out["logits_to_keep"] = kwargs["logits_to_keep"]
        return out

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache
