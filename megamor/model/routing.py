"""MoR routers and the gather/scatter of active tokens (MOR_SPEC.md sections 3 and 4).

Tensors follow megatron's layout: hidden states are [s, b, h] (sequence first).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
    """

    def __init__(self, mask: torch.Tensor, pad_multiple: int = 1, packed: bool = False):
        """mask [s, b] bool: the step's active tokens."""
        s, b = mask.shape
        counts = mask.sum(0)
        # One host sync per step: the gathered length (and the token count) are data dependent.
        k_max, total = torch.stack([counts.max(), counts.sum()]).tolist()
        self.seq_len, self.batch, self.packed = s, b, packed
        self.num_tokens = int(total)
        pos = torch.arange(s, device=mask.device).unsqueeze(1).expand(s, b)
        # Sort key: active tokens first, in position order; inactive after them.
        key = torch.where(mask, pos, pos + s)
        if packed:
            self._init_packed(key, counts, int(k_max), pad_multiple)
            return
        k = _round_rows(max(int(k_max), 1), b, pad_multiple)
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

    def _init_packed(self, key: torch.Tensor, counts: torch.Tensor, k_max: int, multiple: int) -> None:
        from megatron.core.packed_seq_params import PackedSeqParams

        s, b = key.shape
        dev = key.device
        order = key.t().argsort(dim=1)  # [b, s]: each sequence's active positions first
        real = torch.arange(s, device=dev).unsqueeze(0) < counts.unsqueeze(1)  # [b, s]
        positions = order[real]  # [t], grouped by sequence, in position order
        seqs = torch.arange(b, device=dev).unsqueeze(1).expand(b, s)[real]
        t = self.num_tokens
        t_pad = _round_rows(max(t, 1), 1, multiple)
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
    def from_mask(cls, mask: torch.Tensor, pad_multiple: int = 1, packed: bool = False) -> "ActiveSet":
        return cls(mask, pad_multiple, packed)

    @property
    def rows(self) -> int:
        """Rows a GEMM of this step sees (real tokens plus padding)."""
        return self.idx.numel()

    def positions(self) -> torch.Tensor:
        """Original positions, shaped for `attention.Rotary`: [k, b] (padded) or [t, 1] (packed)."""
        return self.idx.unsqueeze(1) if self.packed else self.idx

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] -> [k, b, h] (padded) or [t, 1, h] (packed)."""
        if self.packed:
            s, b, h = x.shape
            rows = x.reshape(s * b, h).index_select(0, self._flat)
            pad = self.idx.numel() - rows.shape[0]
            if pad:
                rows = torch.cat([rows, rows.new_zeros(pad, h)])
            return rows.unsqueeze(1)
        return x.gather(0, self.idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def scatter(self, base: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Out-of-place: base [s, b, h] with the real tokens' rows replaced by y's."""
        s, b, h = base.shape
        if self.packed:
            rows = y.reshape(-1, h)[: self.num_tokens]
        else:
            rows = y.reshape(-1, h) if self.dense else y[self.valid]
        return base.reshape(s * b, h).index_copy(0, self._flat, rows).reshape(s, b, h)

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

    def route(self, x: torch.Tensor, reached: torch.Tensor, capacity: float, threshold: bool):
        """x [s, b, h], reached [s, b] bool (survivors of the previous step).

        Returns (selected [s, b] bool, gate [s, b] fp32, aux_loss scalar or None, stats dict).
        Training: top-k_r per sequence among `reached`, k_r = max(1, floor(c_r * s)).
        Inference (`threshold`): continue iff sigmoid(logit) >= 0.5 (or the aux router's),
        which looks at no future token; a step of capacity 1 keeps every reached token.
        """
        s, b, _ = x.shape
        logit = self.logits(x)
        gate = self.alpha * torch.sigmoid(logit)
        aux_logit = self._aux_logits(x) if self.aux is not None else None
        k = max(1, int(capacity * s))
        # Top-k ranks logits (sigmoid is monotonic); unreachable tokens can never win.
        masked = logit.detach().masked_fill(~reached, float("-inf"))
        top = masked.topk(k, dim=0).indices  # [k, b]
        topk_sel = torch.zeros_like(reached).scatter_(0, top, True) & reached
        decide_logit = aux_logit if aux_logit is not None else logit
        thresh_sel = reached & (torch.sigmoid(decide_logit.detach()) >= 0.5)
        if capacity >= 1.0:
            thresh_sel = reached.clone()
        selected = thresh_sel if threshold else topk_sel
        # BCE between the raw logit and "was selected", over the tokens that reached this step.
        target = topk_sel.to(logit.dtype)
        n = reached.sum().clamp(min=1)
        aux = None
        if self.aux is None:
            bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
            aux = (bce * reached).sum() / n
        else:
            bce = F.binary_cross_entropy_with_logits(aux_logit, target, reduction="none")
            aux = (bce * reached).sum() / n
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

    def route(self, x: torch.Tensor, use_bias: bool, dp_group=None):
        """x [s, b, h] -> depth [s, b] in 1..N_r, gate [s, b], probs [s, b, N_r], logits (all
        fp32), counts [N_r]."""
        self._fp32_buffers()
        logits = self._linear(x)  # [s, b, N_r]
        probs = torch.softmax(logits, dim=-1)
        score = probs.detach() + (self.bias if use_bias else 0.0)
        choice = score.argmax(-1)  # [s, b]
        gate = self.alpha * probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        counts = F.one_hot(choice, self.num_recursions).sum((0, 1)).to(torch.float32)
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


def balancing_loss(probs: torch.Tensor, counts: torch.Tensor, num_recursions: int, dp_group=None):
    """L_bal = sum_i P_i * f_i, P_i local mean probability, f_i = N_r * global fraction of tokens."""
    global_counts = counts.clone()
    if dp_group is not None and torch.distributed.is_initialized():
        torch.distributed.all_reduce(global_counts, group=dp_group)
    f = num_recursions * global_counts / global_counts.sum().clamp(min=1)
    P = probs.float().mean(dim=(0, 1))
    return (P * f).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
