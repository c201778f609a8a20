"""MoR routers and the gather/scatter of active tokens (MOR_SPEC.md sections 3 and 4).

Tensors follow megatron's layout: hidden states are [s, b, h] (sequence first). Under sequence
parallelism (`SequenceShards`) every [s, b, ...] tensor between layers is this tensor-parallel
rank's contiguous slice [s/tp, b, ...] of the sequence, as megatron's SP layers expect; routing
decisions are taken on the whole sequence's scores (gathered, one scalar per token) and the
gathered token sets are themselves sharded over their token dimension (docs/architecture.md,
"Sequence parallelism with routing").
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- sequence shards


class SequenceShards:
    """This rank's part of the sequence under sequence parallelism, and the collectives over
    the tensor-parallel group that routing needs.

    megatron's layout: tensor-parallel rank i holds rows [i n, (i + 1) n) of every [s, b, ...]
    tensor between layers, n = s / tp (its embedding scatters, its SP linears gather and
    reduce-scatter along that first dimension). Without sequence parallelism (`WHOLE`, or a group
    of one) there is one shard and every method is the identity, so the routing code is the same
    for both.
    - `full(t)`: the whole sequence of a per-token tensor, all-gathered along dim 0, outside
      autograd (router scores for top-k, active masks, depths: decisions, not gradients);
    - `local(t)`: this rank's rows of a whole-sequence tensor;
    - `total(t)`: the sum over the shards, differentiable with an identity backward (megatron's
      `reduce_from_tensor_model_parallel_region`): every rank then holds the whole-sequence
      value of a router loss while backward sends each rank the gradient of its own tokens'
      part; the router weights' gradients are summed over tensor parallel afterwards (their
      `sequence_parallel` flag, as megatron's norms and MoE router), which completes the sum.
    """

    def __init__(self, group=None, size: int = 1, rank: int = 0):
        """`group`: the tensor-parallel group (size and rank from it); `size` / `rank` alone
        describe a layout without collectives (tests of the index arithmetic)."""
        self.group = group
        self.size = group.size() if group is not None else size
        self.rank = group.rank() if group is not None else rank

    @property
    def on(self) -> bool:
        return self.size > 1

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """[s/tp, ...] -> [s, ...] (no gradient)."""
        if not self.on:
            return t
        t = t.detach().contiguous()
        out = t.new_empty((t.shape[0] * self.size,) + tuple(t.shape[1:]))
        dist.all_gather_into_tensor(out, t, group=self.group)
        return out

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """[s, ...] -> this rank's [s/tp, ...]."""
        if not self.on:
            return t
        n = t.shape[0] // self.size
        return t[self.rank * n:(self.rank + 1) * n]

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the shards (forward all-reduce, backward identity)."""
        if not self.on:
            return t
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
        return reduce_from_tensor_model_parallel_region(t.clone(), group=self.group)

    def token_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of t [s(/tp), b, ...] over the whole sequence's tokens (dims 0 and 1)."""
        if not self.on:
            return t.mean(dim=(0, 1))
        return self.total(t.sum(dim=(0, 1))) / (t.shape[0] * t.shape[1] * self.size)


WHOLE = SequenceShards()


# ----------------------------------------------------------------------------- active tokens


class ActiveSet:
    """The tokens a recursion step processes, gathered per sequence in causal order.

    Two layouts of the gathered tensor:
    - padded [k, b, h] (default): each sequence's active tokens in position order, then padding
      rows up to the largest count k. Plain causal attention is exact for the real tokens (the
      padding comes after them), so no mask tensor is needed.
      idx [k, b] original positions (padding rows point at 0), valid [k, b] real rows.
    - packed [t, 1, h] (THD, `packed=True`): the real tokens only, grouped by sequence, with
      `packed_seq_params` (cu_seqlens) for megatron / Transformer Engine varlen attention.
      idx [t] original positions.
    `pad_multiple` > 1 pads the number of rows a GEMM sees (k * b, or t) to a multiple of it
    (FP8 GEMMs need 16): padding rows are computed and dropped at scatter, never seen by a real
    token, never counted. Everything a step needs more than once is computed here, once.

    Under sequence parallelism (`shards.on`) `mask` is the whole sequence's, the tensors `gather`
    takes and `scatter` / `put` write are this rank's sequence slice [s/tp, b, h], and the
    gathered set is sharded over its own token dimension as megatron's SP layers expect:
    [k/tp, b, h] (padded) or [t/tp, 1, h] (packed). So k (or t) is padded to a multiple of tp,
    and `pad_multiple` applies to each rank's rows (k/tp * b, or t/tp), which TE's FP8 GEMMs see
    before their all-gather; the padding rows come after every sequence's real tokens, as above.
    """

    def __init__(self, mask: torch.Tensor, pad_multiple: int = 1, packed: bool = False,
                 shards: SequenceShards = WHOLE):
        """mask [s, b] bool: the step's active tokens (the whole sequence's)."""
        s, b = mask.shape
        counts = mask.sum(0)
        # One host sync per step: the gathered length (and the token count) are data dependent.
        k_max, total = torch.stack([counts.max(), counts.sum()]).tolist()
        self.seq_len, self.batch, self.packed = s, b, packed
        self.shards = shards
        self.num_tokens = int(total)
        pos = torch.arange(s, device=mask.device).unsqueeze(1).expand(s, b)
        # Sort key: active tokens first, in position order; inactive after them.
        key = torch.where(mask, pos, pos + s)
        if packed:
            self._init_packed(key, counts, int(k_max), pad_multiple)
            self._init_shards(torch.arange(self.num_tokens, device=mask.device))
            return
        k = _sharded_rows(max(int(k_max), 1), b, pad_multiple, shards.size)
        order = key.argsort(dim=0)[:k]  # [min(k, s), b]
        if order.shape[0] < k:  # padding beyond the sequence length (tiny s, FP8 multiple)
            order = torch.cat([order, order.new_zeros(k - order.shape[0], b)])
        self.valid = torch.arange(k, device=mask.device).unsqueeze(1) < counts.unsqueeze(0)
        self.idx = torch.where(self.valid, order, torch.zeros_like(order))
        self.dense = self.num_tokens == k * b  # no padding rows (expert-choice training)
        self.packed_seq_params = None
        bidx = torch.arange(b, device=mask.device).unsqueeze(0).expand_as(self.idx)
        flat = self.idx * b + bidx
        self._flat = flat.flatten() if self.dense else flat[self.valid]
        if shards.on:
            rows = torch.arange(k * b, device=mask.device).view(k, b)
            self._init_shards(rows.flatten() if self.dense else rows[self.valid])

    def _init_shards(self, set_rows: torch.Tensor) -> None:
        """Sequence parallelism: which real tokens lie in this rank's sequence slice, as rows of
        the (flattened) whole set (`_own_rows`) and of the flattened slice [s/tp * b]
        (`_own_src`). `set_rows`: each real token's row in the set, in `_flat`'s order."""
        if not self.shards.on:
            return
        b, n = self.batch, self.seq_len // self.shards.size
        lo = self.shards.rank * n * b
        mine = (self._flat >= lo) & (self._flat < lo + n * b)
        self._own_rows = set_rows[mine]
        self._own_src = self._flat[mine] - lo

    def _init_packed(self, key: torch.Tensor, counts: torch.Tensor, k_max: int, multiple: int) -> None:
        from megatron.core.packed_seq_params import PackedSeqParams

        s, b = key.shape
        dev = key.device
        order = key.t().argsort(dim=1)  # [b, s]: each sequence's active positions first
        real = torch.arange(s, device=dev).unsqueeze(0) < counts.unsqueeze(1)  # [b, s]
        positions = order[real]  # [t], grouped by sequence, in position order
        seqs = torch.arange(b, device=dev).unsqueeze(1).expand(b, s)[real]
        t = self.num_tokens
        t_pad = _sharded_rows(max(t, 1), 1, multiple, self.shards.size)
        self._flat = positions * b + seqs
        self.idx = torch.cat([positions, positions.new_zeros(t_pad - t)])
        self.valid = torch.arange(t_pad, device=dev) < t
        self.dense = False
        ends = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        if t_pad > t:  # the padding rows form a sequence of their own
            ends = torch.cat([ends, ends.new_full((1,), t_pad)])
        cu = torch.unique_consecutive(ends).to(torch.int32)  # empty sequences dropped
        longest = max(k_max, t_pad - t)
        self.packed_seq_params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
            max_seqlen_q=longest, max_seqlen_kv=longest)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, pad_multiple: int = 1, packed: bool = False,
                  shards: SequenceShards = WHOLE) -> "ActiveSet":
        return cls(mask, pad_multiple, packed, shards)

    @property
    def rows(self) -> int:
        """Rows of the whole set (real tokens plus padding): what a GEMM between a sequence-
        parallel all-gather and reduce-scatter sees, and every GEMM without SP."""
        return self.idx.numel()

    @property
    def shard_rows(self) -> int:
        """Rows of this rank's shard of the set (`rows` without sequence parallelism)."""
        return self.rows // self.shards.size

    def positions(self) -> torch.Tensor:
        """Original positions of the whole set (megatron's SP linears gather it before attention
        and RoPE), shaped for `attention.Rotary`: [k, b] (padded) or [t, 1] (packed)."""
        return self.idx.unsqueeze(1) if self.packed else self.idx

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] -> [k, b, h] (padded) or [t, 1, h] (packed); under sequence parallelism
        x [s/tp, b, h] -> this rank's shard [k/tp, b, h] or [t/tp, 1, h] of the set."""
        if self.shards.on:
            from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region
            # Each rank writes the set rows of its own tokens into a zero set; the reduce-scatter
            # sums the ranks' disjoint rows (exact) and leaves each rank its shard.
            return reduce_scatter_to_sequence_parallel_region(self.own_set(x),
                                                              group=self.shards.group)
        if self.packed:
            s, b, h = x.shape
            rows = x.reshape(s * b, h).index_select(0, self._flat)
            pad = self.idx.numel() - rows.shape[0]
            if pad:
                rows = torch.cat([rows, rows.new_zeros(pad, h)])
            return rows.unsqueeze(1)
        return x.gather(0, self.idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def own_set(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence parallelism: the whole set [k, b, h] (or [t, 1, h]) holding the rows of the
        tokens in this rank's slice x [s/tp, b, h], zeros elsewhere (the gather's contribution
        before its reduce-scatter)."""
        h = x.shape[-1]
        rows = x.reshape(-1, h).index_select(0, self._own_src)
        out = rows.new_zeros(self.rows, h).index_copy(0, self._own_rows, rows)
        return out.view(*self.idx.shape, h) if not self.packed else out.unsqueeze(1)

    def set_rows(self, y: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows [n, h] of a set-layout tensor y (this rank's shard under SP),
        in `own_rows`' order; n: all real tokens, or under SP those in this rank's slice."""
        h = y.shape[-1]
        if self.shards.on:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
            # Backward reduce-scatters: each rank's rows feed only its own slice.
            whole = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=True,
                                                         group=self.shards.group)
            return whole.reshape(-1, h).index_select(0, self._own_rows)
        if self.packed:
            return y.reshape(-1, h)[: self.num_tokens]
        return y.reshape(-1, h) if self.dense else y[self.valid]

    def own_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows [n, c] of a sequence-layout tensor t [s, b, c] ([s/tp, b, c]
        under SP), in `set_rows`' order."""
        return t.reshape(-1, t.shape[-1]).index_select(0, self._own_src if self.shards.on else self._flat)

    def put(self, base: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Out-of-place: base [s, b, c] ([s/tp, b, c] under SP) with the real tokens' rows
        replaced by `rows` [n, c] (`own_rows`' order)."""
        c = base.shape[-1]
        idx = self._own_src if self.shards.on else self._flat
        return base.reshape(-1, c).index_copy(0, idx, rows).view(base.shape)

    def scatter(self, base: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Out-of-place: base [s, b, h] with the real tokens' rows replaced by y's (set layout);
        under SP base is this rank's slice and y its shard of the set."""
        return self.put(base, self.set_rows(y))

    def attention_mask(self) -> torch.Tensor:
        """[b, 1, k, k] bool, True = masked: causal among the gathered tokens, padding masked.
        (Padded layout. The model attends with plain causal masking, which gives the real tokens
        the same result; this explicit form is the reference the tests compare against.)"""
        k = self.idx.shape[0]
        causal = torch.ones(k, k, dtype=torch.bool, device=self.idx.device).triu(1)
        pad_key = ~self.valid.t()  # [b, k]
        return (causal.unsqueeze(0) | pad_key.unsqueeze(1)).unsqueeze(1)  # [b, 1, k, k]

    def attention_mask_to_full(self) -> torch.Tensor:
        """[b, 1, k, s] for queries of this set against keys of every position (KV sharing)."""
        keys = torch.arange(self.seq_len, device=self.idx.device)
        m = keys.view(1, 1, -1) > self.idx.t().unsqueeze(-1)  # [b, k, s]
        return m.unsqueeze(1)


def _round_rows(k: int, b: int, multiple: int) -> int:
    """Smallest k' >= k with k' * b a multiple of `multiple`."""
    if multiple <= 1:
        return k
    step = multiple // math.gcd(multiple, b)
    return -(-k // step) * step


def _sharded_rows(k: int, b: int, multiple: int, shards: int) -> int:
    """Smallest k' >= k that splits into `shards` equal shards each of whose k'/shards * b rows
    is a multiple of `multiple` (`_round_rows` for one shard)."""
    return shards * _round_rows(-(-k // shards), b, multiple)


# ----------------------------------------------------------------------------- aux-loss plumbing


class AttachAuxLoss(torch.autograd.Function):
    """Return `x` unchanged; in backward, also send d(scale * aux)/d(aux) = scale into `aux`.

    Router losses are computed on whatever pipeline stage holds the router; attaching them to the
    activations that leave that stage makes backward deliver their gradient there, so nothing but
    the hidden state crosses stage boundaries (the pattern of megatron's MoE aux-loss scaler).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


# ----------------------------------------------------------------------------- routers


class Fp32Router(nn.Module):
    """A router computes in fp32 whatever the model's dtype: its logits, scores, top-k / argmax,
    losses and statistics (megatron's MoE routers likewise, `moe_router_dtype=fp32`); the caller
    casts the gate to the activations' dtype. `keeps_fp32`: a bf16 model keeps this module's
    parameters and buffers fp32 (megamor.precision.wrap_for_precision); where another wrapper
    cast the buffers anyway (DeepSpeed's bf16 engine), they go back to fp32 before use."""

    keeps_fp32 = True

    def _fp32_buffers(self) -> None:
        for name, b in self.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != torch.float32:
                self._buffers[name] = b.float()

    def _load_from_state_dict(self, *args, **kwargs):
        self._fp32_buffers()  # load fp32 values into fp32 buffers
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """`route`, called through the module (`router(...)`) so that forward pre-hooks run
        before the weights are read: megatron's DDP waits there for the parameter all-gather
        under parallel.overlap_param_gather (with a bare `route` call, a router would read
        weights still being gathered and leave their gather pending into the next step)."""
        return self.route(*args, **kwargs)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., h] (any dtype) @ weight^T in fp32."""
        return x.float() @ self.weight.float().t()


class ExpertChoiceRouter(Fp32Router):
    """One router per recursion step: bias-free d -> 1 linear, gate = alpha * sigmoid(logit)."""

    def __init__(self, hidden_size: int, alpha: float, init_std: float, aux_router: bool):
        super().__init__()
        self.alpha = alpha
        self.weight = nn.Parameter(torch.empty(1, hidden_size))
        nn.init.normal_(self.weight, 0.0, init_std)
        # Optional auxiliary router (MLP on detached states) used only for causal inference.
        self.aux = None
        if aux_router:
            self.aux = nn.Sequential(
                nn.Linear(hidden_size, hidden_size // 2, bias=False), nn.SiLU(),
                nn.Linear(hidden_size // 2, 1, bias=False),
            )
            for mod in self.aux:
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, 0.0, init_std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x).squeeze(-1)  # [s, b] fp32

    def _aux_logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.aux[0].weight
        return self.aux(x.detach().to(w.dtype)).squeeze(-1).float()

    def route(self, x: torch.Tensor, reached: torch.Tensor, capacity: float, threshold: bool,
              shards: SequenceShards = WHOLE):
        """x [s, b, h] ([s/tp, b, h] under sequence parallelism), reached [s, b] bool (survivors
        of the previous step, the whole sequence).

        Returns (selected [s, b] bool (whole sequence), gate [s, b] fp32 (x's rows), aux_loss
        scalar or None, stats dict (whole-sequence values)).
        Training: top-k_r per sequence among `reached`, k_r = max(1, floor(c_r * s)).
        Inference (`threshold`): continue iff sigmoid(logit) >= 0.5 (or the aux router's),
        which looks at no future token; a step of capacity 1 keeps every reached token.
        Under sequence parallelism the decisions are taken on the whole sequence's logits
        (all-gathered: one scalar per token), identical on every tensor-parallel rank.
        """
        s = x.shape[0] * shards.size
        logit = self.logits(x)
        gate = self.alpha * torch.sigmoid(logit)
        aux_logit = self._aux_logits(x) if self.aux is not None else None
        k = max(1, int(capacity * s))
        # Top-k ranks logits (sigmoid is monotonic); unreachable tokens can never win.
        whole = shards.full(logit.detach())
        masked = whole.masked_fill(~reached, float("-inf"))
        top = masked.topk(k, dim=0).indices  # [k, b]
        topk_sel = torch.zeros_like(reached).scatter_(0, top, True) & reached
        decide_logit = shards.full(aux_logit.detach()) if aux_logit is not None else whole
        thresh_sel = reached & (torch.sigmoid(decide_logit) >= 0.5)
        if capacity >= 1.0:
            thresh_sel = reached.clone()
        selected = thresh_sel if threshold else topk_sel
        # BCE between the raw logit and "was selected", over the tokens that reached this step
        # (each rank's own tokens, summed over the shards).
        target = shards.local(topk_sel).to(logit.dtype)
        mine = shards.local(reached)
        n = reached.sum().clamp(min=1)
        bce = F.binary_cross_entropy_with_logits(logit if self.aux is None else aux_logit, target,
                                                 reduction="none")
        aux = shards.total((bce * mine).sum()) / n
        agree = ((thresh_sel == topk_sel) & reached).sum().float() / n
        stats = {"selected": selected.sum().detach().float(), "reached": reached.sum().detach().float(),
                 "aux_loss": aux.detach(), "sampling_acc": agree.detach()}
        return selected, gate, aux, stats


class TokenChoiceRouter(Fp32Router):
    """One router on H^1: d -> N_r logits, softmax; depth = argmax (+ loss-free bias)."""

    def __init__(self, hidden_size: int, num_recursions: int, alpha: float, init_std: float):
        super().__init__()
        self.alpha = alpha
        self.num_recursions = num_recursions
        self.weight = nn.Parameter(torch.empty(num_recursions, hidden_size))
        nn.init.normal_(self.weight, 0.0, init_std)
        # Loss-free balancing state: not trained, updated after each optimizer step.
        self.register_buffer("bias", torch.zeros(num_recursions), persistent=True)
        self.register_buffer("load", torch.zeros(num_recursions), persistent=False)

    def route(self, x: torch.Tensor, use_bias: bool, shards: SequenceShards = WHOLE):
        """x [s, b, h] ([s/tp, b, h] under sequence parallelism) -> depth [s, b] in 1..N_r,
        gate [s, b], probs [s, b, N_r], logits (all fp32, x's rows), counts [N_r] (the whole
        sequence's: summed over the shards)."""
        self._fp32_buffers()
        logits = self._linear(x)  # [s, b, N_r]
        probs = torch.softmax(logits, dim=-1)
        score = probs.detach() + (self.bias if use_bias else 0.0)
        choice = score.argmax(-1)  # [s, b]
        gate = self.alpha * probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        counts = F.one_hot(choice, self.num_recursions).sum((0, 1)).to(torch.float32)
        if shards.on:
            counts = shards.total(counts)
        if self.training:
            self.load += counts
        return choice + 1, gate, probs, logits, counts

    @torch.no_grad()
    def update_bias(self, rate: float, dp_group=None) -> None:
        """b_i += rate * sign(mean_load - load_i), loads global over data-parallel ranks."""
        self._fp32_buffers()
        load = self.load.clone()
        if dp_group is not None and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, group=dp_group)
        self.bias += rate * torch.sign(load.mean() - load)
        self.load.zero_()


def balancing_loss(probs: torch.Tensor, counts: torch.Tensor, num_recursions: int, dp_group=None,
                   shards: SequenceShards = WHOLE):
    """L_bal = sum_i P_i * f_i, P_i local mean probability (the micro-batch's whole sequences),
    f_i = N_r * global fraction of tokens (`counts`: the micro-batch's, all-reduced here over
    data parallel)."""
    global_counts = counts.clone()
    if dp_group is not None and torch.distributed.is_initialized():
        torch.distributed.all_reduce(global_counts, group=dp_group)
    f = num_recursions * global_counts / global_counts.sum().clamp(min=1)
    P = shards.token_mean(probs.float())
    return (P * f).sum()


def z_loss(logits: torch.Tensor, shards: SequenceShards = WHOLE) -> torch.Tensor:
    return shards.token_mean(torch.logsumexp(logits.float(), dim=-1).pow(2))
