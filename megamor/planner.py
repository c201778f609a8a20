"""`megamor plan`: predict per-GPU memory and step time of parallel layouts, and rank them.

    megamor plan --preset 1p7b --seq 2048 --nodes 8 [--gpus-per-node 8 --gpu-memory-gb 80 ...]
                 [--gbs 256] [--top 15] [--pp 8] [section.option=value ...]

For a model (a preset plus overrides, as `megamor pretrain` takes them), a sequence length, a
global batch and a cluster, every layout (tensor x pipeline x data parallel, model chunks per
pipeline stage, micro-batch, recomputation, optimizer engine) that start-up validation accepts
is costed; those that fit in GPU memory are ranked by step time. Defaults describe H100 SXM 80GB
nodes of 8 GPUs. A pipeline is cut as the trainer cuts it: contiguously (`balanced_cut`), or with
parallel.virtual_pipeline_size = V > 1 into P x V interleaved pieces (`interleaved_cut`; piece j
on stage j mod P); a stage's chunks share one copy of each unique layer.

Memory per GPU (the fullest pipeline stage):
- weights, gradients, optimizer state of the stage's parameters (every unique layer its slice of
  the unrolled plan uses, the embedding on the first stage, its tied copy on the last), bytes
  per parameter by engine and precision (`STATE_BYTES`): megatron's distributed optimizer
  (what megamor trains with: fp32 gradient buffer, fp32 master + Adam moments sharded over data
  parallel), and DeepSpeed ZeRO-1/2/3 (`parallel.engine=deepspeed parallel.zero_stage=k`;
  under ZeRO-3 the shared block is held gathered over the recursion loop);
- activations of one micro-batch (`activation_bytes`: the tensors a Llama-style layer saves for
  backward, at the tokens each unrolled layer processes; tensor parallel splits only what lies
  between its column- and row-parallel linears unless sequence parallelism is on; recompute
  none / selective / full), times the micro-batches in flight on the stage under 1F1B
  (min(m, P - p) on stage p; interleaved: megatron's warm-up of 2 (P - p - 1) + (V - 1) P chunk
  passes plus one, each chunk's own activations, `peak_in_flight`), plus the loss's fp32
  softmax and its gradient on the last stage.
Step time: each stage's FLOPs (`megamor.flops.pipeline_costs`, the FLOPs model the trainer's MFU
uses) at an assumed achievable fraction of peak, plus its tensor-parallel all-reduces (under
sequence parallelism the same volume as all-gathers and reduce-scatters, plus a routed model's
exchange of each step's token set) and pipeline send/receive per micro-batch (s / tp rows per
rank under sequence parallelism; every chunk sends and receives, so V times the hops); the 1F1B
pipeline m max(c_p) + (sum(c_p) - max(c_p)) / V (c_p: one micro-batch through stage p's chunks;
the fill/drain bubble shrinks V-fold under interleaving); then the
data-parallel gradient reduce-scatter + parameter all-gather, only the part that overlap does not
hide (`exposed_dp_comm`; in full with --no-overlap and for the DeepSpeed engines), the all-reduce
of shared-layer copies across stages (after the data-parallel reduction, not hidden), and the
optimizer step
(memory bound). Bandwidths are per GPU; a group is intra-node when its ranks share a node
(megatron's rank order: tensor fastest, then data, then pipeline).
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megamor.config import Config, ConfigError, load_config
from megamor.flops import expected_layer_tokens, flops_per_step, layer_matmul_params, pipeline_costs
from megamor.layout import (build_plan, interleaved_cut, stage_pieces,
                            unique_layers_of, useful_fraction)

ENGINES = ("megatron", "zero1", "zero2", "zero3")
# Model chunks per pipeline stage tried (parallel.virtual_pipeline_size; megatron engine only).
# VP 4 is left out: its exact cut takes seconds per pipeline size (megamor.layout.interleaved_cut).
VIRTUAL = (1, 2, 3)
RECOMPUTE = ("none", "selective", "full")
GIB = 2.0**30


@dataclass
class Cluster:
    """The machines a plan is for. Defaults: H100 SXM 80GB, 8 per node, NVLink 4 inside a node,
    one 400 Gb/s InfiniBand NIC per GPU between nodes."""

    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0
    peak_tflops: float = 989.0  # dense bf16 per GPU (datasheet)
    achievable: float = 0.55  # fraction of peak a step's matmuls reach in practice
    intra_node_gbs: float = 360.0  # GB/s per GPU, ring all-reduce bus bandwidth over NVLink
    inter_node_gbs: float = 40.0  # GB/s per GPU, achieved over one 400 Gb/s NIC
    memory_tbs: float = 3.35  # HBM3, TB/s (optimizer step)
    usable_memory: float = 0.9  # fraction of GPU memory a plan may fill (allocator, workspaces)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def validate(self) -> None:
        for name in ("gpus_per_node", "nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster: --{name.replace('_', '-')}={getattr(self, name)} "
                                  f"must be >= 1")
        for name in ("gpu_memory_gb", "peak_tflops", "intra_node_gbs", "inter_node_gbs",
                     "memory_tbs"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"cluster: --{name.replace('_', '-')}={getattr(self, name)} "
                                  f"must be > 0")
        for name in ("achievable", "usable_memory"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"cluster: --{name.replace('_', '-')}={getattr(self, name)} "
                                  f"must be in (0, 1]")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    mbs: int
    recompute: str = "none"
    engine: str = "megatron"
    sequence_parallel: bool = False
    vp: int = 1  # model chunks per pipeline stage (megatron's interleaved schedule)

    def overrides(self) -> list[str]:
        return [f"parallel.tensor_model_parallel_size={self.tp}",
                f"parallel.pipeline_model_parallel_size={self.pp}",
                f"parallel.virtual_pipeline_size={self.vp}",
                f"parallel.data_parallel_size={self.dp}", f"train.micro_batch_size={self.mbs}",
                f"model.recompute={self.recompute}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}"]


@dataclass
class Prediction:
    layout: Layout
    memory: dict  # GiB per GPU on the fullest stage: weights, grads, optimizer, activations, total
    step_s: float
    parts: dict  # seconds: compute, tp, pp, bubble, dp, shared, optimizer
    mfu: float
    tokens_per_s: float
    stage_balance: float  # useful fraction of the pipeline cut
    fits: bool
    sizes: list = field(default_factory=list)


# Bytes per parameter (weights, gradients, optimizer state), and which of them data parallel shards.
# megatron: the trainer's DDP (grad_reduce_in_fp32) + distributed optimizer; fp32 training keeps
# no master copy (the optimizer's shards are views of the weights).
STATE_BYTES = {
    # engine: {precision: (weights, grads, optimizer)}, sharded: which parts divide by dp
    "megatron": {"bf16": (2, 4, 12), "fp32": (4, 4, 8)},
    "zero1": {"bf16": (2, 2, 12), "fp32": (4, 4, 8)},
    "zero2": {"bf16": (2, 2, 12), "fp32": (4, 4, 8)},
    "zero3": {"bf16": (2, 2, 12), "fp32": (4, 4, 8)},
}
SHARDED = {"megatron": ("optimizer",), "zero1": ("optimizer",), "zero2": ("grads", "optimizer"),
           "zero3": ("weights", "grads", "optimizer")}


def _plan(cfg: Config):
    m = cfg.model
    return build_plan(m.arch, m.num_layers, m.num_recursions, m.sharing,
                      cfg.routing.capacities(m.num_recursions))


def unique_layers(cfg: Config) -> int:
    """Distinct layers of the model (what `build_plan` gives as `num_unique`), from the config."""
    m = cfg.model
    if m.arch == "vanilla":
        return m.num_layers
    middle = m.sharing.startswith("middle")
    return (m.num_layers - 2 if middle else m.num_layers) // m.num_recursions + (2 if middle else 0)


def router_parameters(cfg: Config) -> float:
    """Parameters of the router of one recursion step (0 unless arch=mor)."""
    m, h = cfg.model, cfg.model.hidden_size
    if m.arch != "mor":
        return 0.0
    router = h * (m.num_recursions if cfg.routing.type == "token_choice" else 1)
    if cfg.routing.causal == "aux_router":
        router += h * (h // 2) + h // 2 + (h // 2)
    return router


def model_parameters(cfg: Config, vocab: int) -> float:
    """Every parameter of the model once (tied embedding, unique layers, routers, final norm)."""
    m = cfg.model
    per_layer = layer_matmul_params(m) + 2 * m.hidden_size
    return (unique_layers(cfg) * per_layer + vocab * m.hidden_size + m.hidden_size
            + router_parameters(cfg) * (m.num_recursions if m.arch == "mor" else 0))


def checkpoint_bytes(cfg: Config, vocab: int, precision: str) -> int:
    """Predicted size of one checkpoint: per parameter the weights in the training precision,
    the optimizer's fp32 master copy and Adam's two moments (12 bytes; megatron's fully
    reshardable format stores the master copy even for fp32 runs), and under the DeepSpeed
    engine its own engine state, which repeats the weights; plus 1 MiB of index, tokenizer and
    config. The tiny model at fp32: 5.06 MB predicted, 4.40 MB written by the megatron engine;
    6.06 MB predicted, 5.28 MB written by the DeepSpeed engine (ZeRO-2, 2 ranks)."""
    weights = 2 if precision in ("bf16", "fp8") else 4
    per = weights + 12 + (weights if cfg.parallel.engine == "deepspeed" else 0)
    return int(model_parameters(cfg, vocab) * per) + 2**20


def stage_parameters(cfg: Config, plan, pieces, vocab: int, tp: int) -> list[float]:
    """Parameters each pipeline stage holds per tensor-parallel rank (copies of shared layers
    across stages included: each copy has its own gradients and optimizer state; a stage's
    model chunks share one copy). `pieces`: each stage's [start, stop) chunks
    (`megamor.layout.stage_pieces`)."""
    m = cfg.model
    h = m.hidden_size
    per_layer = layer_matmul_params(m) / tp + 2 * h  # matmuls split by tp, two norms replicated
    router = router_parameters(cfg)
    out = []
    for p, mine in enumerate(pieces):
        n = len(unique_layers_of(plan, mine)) * per_layer
        n += router * sum(1 for a, b in mine for l in plan.layers[a:b] if l.first_in_step)
        if p == 0:
            n += vocab * h / tp
        if p == len(pieces) - 1:
            n += h + (vocab * h / tp if len(pieces) > 1 else 0.0)  # final norm, tied output copy
        out.append(n)
    return out


# Elements one token leaves saved per layer, by what builds the layer: (replicated over tensor
# parallel unless sequence parallel, split by tensor parallel), as functions of the shape.
# "local": counted with torch.autograd.graph.saved_tensors_hooks on megatron-core 0.16.1's local
# layer with torch SDPA attention (fp32, CPU): norm inputs/outputs 4h; q and the attention output
# twice each ([s, b, n_h d] and SDPA's [b, n_h, s, d]); k and v with their pre-RoPE, RoPE'd and
# SDPA-layout copies (5 n_g d); the SwiGLU gate, up, silu(gate), product and fc1 chunk (5f).
# "te": what Transformer Engine's fused modules keep (LayerNormLinear: norm input and output;
# flash attention: q, k, v, output; fc1 output 2f and fc2 input f); not measurable here.
SAVED_PER_TOKEN = {
    "local": lambda h, nh_d, ng_d, f: (4 * h, 4 * nh_d + 5 * ng_d + 5 * f),
    "te": lambda h, nh_d, ng_d, f: (4 * h, 2 * nh_d + 2 * ng_d + 3 * f),
}


def activation_bytes(cfg: Config, plan, piece: tuple[int, int], first: bool, last: bool,
                     mbs: int, seq: int, vocab: int, tp: int, sp: bool, recompute: str, act: int,
                     backend: str = "te") -> float:
    """Bytes one micro-batch leaves saved for backward by one model chunk (per tensor-parallel
    rank): unrolled layers [start, stop) = `piece`; `first`: it holds the embedding, `last`:
    the output layer and loss. An empty chunk (a pass-through) keeps nothing.

    Per token of a layer: `SAVED_PER_TOKEN[backend]`. Full recompute keeps each layer's input
    (h) and rebuilds one layer (or one recursion step with model.recompute_unit=step) during
    backward. Routed steps add the step input at full length and two gathered-length tensors
    (what the scatter-back adds onto). The last stage keeps the fp32 softmax of the loss
    (4 bytes per vocabulary entry) and, at the start of backward, its gradient.

    Both backends run fused attention (torch SDPA / Transformer Engine), which keeps no k x k
    scores, so selective recompute (core attention only) saves nothing here; it costs its
    attention forward again in time.
    """
    m = cfg.model
    h, d, nh, ng, f = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    rep, split = SAVED_PER_TOKEN[backend](h, nh * d, ng * d, f)
    rep, split = rep / (tp if sp else 1), split / tp
    tokens = [t * mbs for t in expected_layer_tokens(plan, seq)]
    a, b = piece
    if a == b:
        return 0.0

    def full_layer(k: float) -> float:
        return k * (rep + split) * act

    saved = 0.0
    if recompute == "full":
        unit = getattr(m, "recompute_unit", "layer")
        starts = [l for l in plan.layers[a:b] if unit != "step" or l.step == 0 or l.first_in_step
                  or l.index == a]
        saved = sum(tokens[l.index] * h / (tp if sp else 1) * act for l in starts)
        if unit == "step":
            groups: dict = {}
            for l in plan.layers[a:b]:
                key = (l.step, l.index) if l.step == 0 else ("step", l.step)
                groups[key] = groups.get(key, 0.0) + full_layer(tokens[l.index])
            saved += max(groups.values())  # one unit rebuilt at a time
        else:
            saved += max(full_layer(tokens[i]) for i in range(a, b))
    else:
        saved = sum(full_layer(tokens[i]) for i in range(a, b))
    if m.arch == "mor":
        for step in {l.step for l in plan.layers[a:b] if l.step >= 1}:
            k = min(tokens[l.index] for l in plan.layers if l.step == step)
            saved += (seq * mbs + 2 * k) * h * act / (tp if sp else 1)
    shard = tp if sp else 1  # sequence parallelism: each rank holds s / tp positions
    if first:
        saved += seq * mbs * h * act / shard  # embedding output
    if last:
        saved += seq * mbs * (vocab / tp * 4 * 2 + h * act / shard)  # softmax + its gradient, norm output
    return saved


def peak_in_flight(chunk_bytes: list[float], num_stages: int, stage: int,
                   num_micro: int) -> float:
    """Peak bytes of saved activations on pipeline stage `stage` under megatron's 1F1B
    schedules, `chunk_bytes[c]`: what one micro-batch leaves saved in the stage's chunk c.

    One chunk: min(m, P - stage) micro-batches in flight. Interleaved (V chunks): megatron's
    `get_pp_rank_microbatches` runs 2 (P - stage - 1) + (V - 1) x P forward passes in warm-up
    (groups of P micro-batches, microbatch_group_size_per_vp_stage's default, going through
    chunk 0, 1, .., V-1), then alternates one forward and one backward (backward walks the
    chunks from V-1 down); simulated here pass by pass."""
    V, P = len(chunk_bytes), num_stages
    if V == 1:
        return min(num_micro, P - stage) * chunk_bytes[0]
    total = num_micro * V
    group = P

    def order(chunks):
        return [c for g in range(0, num_micro, group)
                for c in chunks for _ in range(min(group, num_micro - g))]

    fwd, bwd = order(range(V)), order(range(V - 1, -1, -1))
    warmup = min(total, 2 * (P - stage - 1) + (V - 1) * group)
    held = sum(chunk_bytes[c] for c in fwd[:warmup])
    peak = held
    for i in range(total - warmup):
        held += chunk_bytes[fwd[warmup + i]]
        peak = max(peak, held)
        held -= chunk_bytes[bwd[i]]
    return peak


def exposed_dp_comm(rs: float, ag: float, params: float, stage: int, dp: int,
                    micro_step_s: float) -> float:
    """The part of stage `stage`'s data-parallel gradient reduce-scatter (`rs` s) and parameter
    all-gather (`ag` s) that overlap (parallel.overlap_grad_reduce / overlap_param_gather, on
    by default on GPUs) does not hide. megatron's DDP splits the first stage's buffer into
    buckets of max(40M, 1M x dp) parameters: each bucket's reduce-scatter starts when the last
    micro-batch's backward has produced its gradients (hidden behind the rest of that backward,
    ~2/3 of a micro-step), each bucket's all-gather is waited for by the next step's first
    forward before the bucket's first use (hidden behind that forward, ~1/3), and the last
    bucket to be ready is never hidden. Later stages hold one bucket (megatron turns bucketing
    off there): their reduce-scatter runs while the `stage` stages before them finish their
    backward, their all-gather is waited for before their first forward."""
    if stage == 0:
        last = min(1.0, max(40e6, 1e6 * dp) / max(params, 1.0))
        return max(rs - 2 * micro_step_s / 3, rs * last) + max(ag - micro_step_s / 3, ag * last)
    return max(0.0, rs - stage * 2 * micro_step_s / 3) + ag


@functools.lru_cache(maxsize=256)
def _cut(costs, num_stages: int, vp: int) -> tuple[int, ...]:
    """`interleaved_cut`, once per cost vector and shape (every candidate layout asks)."""
    return tuple(interleaved_cut(costs, num_stages, vp))


def predict(cfg: Config, layout: Layout, seq: int, gbs: int, cluster: Cluster,
            vocab: int | None = None, precision: str = "bf16",
            overlap: bool = True) -> Prediction:
    """Memory and step time of one layout (see the module docstring for the model)."""
    m = cfg.model
    vocab = vocab or m.vocab_size
    if vocab is None:
        raise ConfigError("the plan needs the vocabulary size: set model.vocab_size")
    tp, pp, dp, mbs = layout.tp, layout.pp, layout.dp, layout.mbs
    act = 2 if precision in ("bf16", "fp8") else 4
    backend = "local" if precision == "fp32" else "te"  # CPU runs fp32 on the local backend
    plan = _plan(cfg)
    costs = pipeline_costs(m, plan, seq, vocab, cfg.routing)
    vp = layout.vp
    explicit = cfg.parallel.pipeline_layers
    sizes = ([int(x) for x in explicit] if explicit is not None and len(explicit) == pp * vp
             else list(_cut(costs, pp, vp)) if vp > 1 else None)
    pieces = stage_pieces(plan, pp, vp, sizes, costs)  # each stage's chunks
    sizes = [b - a for c in range(vp) for mine in pieces for a, b in [mine[c]]]  # execution order
    num_micro = gbs // (mbs * dp)

    # ---- memory
    w_b, g_b, o_b = STATE_BYTES[layout.engine]["fp32" if act == 4 else "bf16"]
    shard = SHARDED[layout.engine]
    params = stage_parameters(cfg, plan, pieces, vocab, tp)
    mem = []
    for p in range(pp):
        n = params[p]
        weights = n * w_b / (dp if "weights" in shard else 1)
        if layout.engine == "zero3":
            # the layer being computed is gathered whole, and the shared recursion block is
            # held gathered over the recursion loop (parallel.zero3_shared_block=once)
            looped = {l.unique for l in plan.layers if l.step > 0}
            weights += layer_matmul_params(m) / tp * w_b * (2 + len(looped))
        grads = n * g_b / (dp if "grads" in shard else 1)
        opt = n * o_b / (dp if "optimizer" in shard else 1)
        chunk_acts = [activation_bytes(cfg, plan, piece, p == 0 and c == 0,
                                       p == pp - 1 and c == vp - 1, mbs, seq, vocab, tp,
                                       layout.sequence_parallel, layout.recompute, act, backend)
                      for c, piece in enumerate(pieces[p])]
        acts = peak_in_flight(chunk_acts, pp, p, num_micro)
        mem.append({"weights": weights / GIB, "grads": grads / GIB, "optimizer": opt / GIB,
                    "activations": acts / GIB, "total": (weights + grads + opt + acts) / GIB})
    worst = max(mem, key=lambda x: x["total"])

    # ---- time
    peak = cluster.peak_tflops * 1e12 * cluster.achievable
    tp_bw = (cluster.intra_node_gbs if tp <= cluster.gpus_per_node else cluster.inter_node_gbs) * 1e9
    dp_bw = (cluster.intra_node_gbs if tp * dp <= cluster.gpus_per_node else cluster.inter_node_gbs) * 1e9
    pp_bw = (cluster.intra_node_gbs if tp * dp * pp <= cluster.gpus_per_node else cluster.inter_node_gbs) * 1e9
    loads = costs.loads(sizes, pp)  # training FLOPs per sequence on each stage
    layer_tokens = expected_layer_tokens(plan, seq)
    stage_time = []  # one micro-batch through all of a stage's chunks
    for p, mine in enumerate(pieces):
        fl = loads[p] * mbs
        held = [i for a, b in mine for i in range(a, b)]  # the unrolled layers it runs
        layer_fl = sum(costs.layers[i] for i in held) * mbs
        if layout.recompute == "full":
            fl += layer_fl / 3.0  # one more forward of every layer
        elif layout.recompute == "selective":  # one more forward of core attention
            matmul = 6.0 * layer_matmul_params(m) * sum(layer_tokens[i] for i in held)
            fl += (layer_fl / mbs - matmul) * mbs / 3.0
        compute = fl / tp / peak
        tp_comm = 0.0
        if tp > 1:  # 2 all-reduces forward + 2 backward per layer (4 with sequence parallel split)
            elems = sum(layer_tokens[i] for i in held) * mbs * m.hidden_size
            tp_comm = 4 * 2 * (tp - 1) / tp * elems * act / tp_bw
            if layout.sequence_parallel and m.arch == "mor":
                # Each routed step's set exchange: reduce-scatter at the gather, all-gather at
                # the scatter, mirrored in backward (router scores: one scalar per token, omitted).
                for a, b in mine:
                    steps = {l.step for l in plan.layers[a:b] if l.step >= 1}
                    k = sum(min(layer_tokens[l.index] for l in plan.layers if l.step == st)
                            for st in steps)
                    tp_comm += 4 * (tp - 1) / tp * k * mbs * m.hidden_size * act / tp_bw
        p2p = 0.0
        if pp > 1:
            wire = 2 * m.hidden_size + 2 if m.arch == "mor" else m.hidden_size
            wire /= tp if layout.sequence_parallel else 1  # each rank sends its s / tp rows
            # every chunk receives its input and sends its output (and the gradients back),
            # except that the first piece receives none and the last piece sends none
            hops = 2 * vp - (p == 0) - (p == pp - 1)
            p2p = hops * seq * mbs * wire * act / pp_bw
        stage_time.append(compute + tp_comm + p2p)
    # 1F1B: m micro-batches at the slowest stage's pace plus the fill/drain of one micro-batch's
    # chain through the other stages; interleaving V chunks cuts that fill/drain V-fold.
    pipeline = num_micro * max(stage_time) + (sum(stage_time) - max(stage_time)) / vp
    compute_only = num_micro * max(stage_time)
    n_max = max(params)
    dp_comm = dp_total = 0.0
    if dp > 1:
        # fp32 grad reduce-scatter + param gather, per stage
        rs = [(dp - 1) / dp * n * 4 / dp_bw for n in params]
        ag = [(dp - 1) / dp * n * w_b / dp_bw for n in params]
        dp_total = max(r + g for r, g in zip(rs, ag))
        if layout.engine == "megatron" and overlap:
            dp_comm = max(exposed_dp_comm(rs[p], ag[p], params[p], p, dp, stage_time[p])
                          for p in range(pp))
        else:
            dp_comm = dp_total
        if layout.engine == "zero3":
            dp_comm += num_micro * 2 * (dp - 1) / dp * n_max * w_b / dp_bw
    shared = 0.0
    if pp > 1:
        per_layer = layer_matmul_params(m) / tp
        held = [set(unique_layers_of(plan, mine)) for mine in pieces]
        for mine in held:
            copies = [u for u in mine if sum(u in other for other in held) > 1]
            shared = max(shared, 2 * len(copies) * per_layer * 4 / pp_bw)
    optimizer = n_max * (w_b + g_b + 2 * o_b) / (dp if "optimizer" in shard else 1) / (cluster.memory_tbs * 1e12)
    step = pipeline + dp_comm + shared + optimizer
    model_flops = flops_per_step(m, plan, [t * gbs for t in layer_tokens], seq, gbs, vocab,
                                 cfg.routing)["total"]
    world = tp * pp * dp
    mfu = model_flops / (step * world * cluster.peak_tflops * 1e12)
    usable = cluster.gpu_memory_gb * cluster.usable_memory
    return Prediction(layout=layout, memory=worst, step_s=step,
                      parts={"pipeline": pipeline, "bubble": pipeline - compute_only,
                             "dp": dp_comm, "dp_total": dp_total, "shared": shared,
                             "optimizer": optimizer},
                      mfu=mfu, tokens_per_s=gbs * seq / step,
                      stage_balance=useful_fraction(loads), fits=worst["total"] <= usable,
                      sizes=sizes)


def candidates(cfg: Config, seq: int, gbs: int, cluster: Cluster, engines=ENGINES,
               recompute=RECOMPUTE, micro_batches=(1, 2, 4, 8, 16),
               virtual=VIRTUAL, pipelines=None) -> list[Layout]:
    """Every layout of the cluster that megamor's start-up validation accepts (tensor parallel
    inside a node); pipelines also with `virtual` model chunks per stage (megatron engine).
    `pipelines`: only these pipeline sizes (default: all)."""
    out = []
    world = cluster.world
    for tp in [t for t in range(1, cluster.gpus_per_node + 1) if cluster.gpus_per_node % t == 0]:
        for pp in [p for p in range(1, cfg.model.num_layers + 1) if world % (tp * p) == 0
                   and (pipelines is None or p in pipelines)]:
            dp = world // (tp * pp)
            for vp in ([v for v in virtual if v == 1 or "megatron" in engines]
                       if pp > 1 else [1]):
                for mbs in micro_batches:
                    for sp in ([False, True] if tp > 1 else [False]):
                        trial = copy.deepcopy(cfg)
                        t = trial.train
                        t.micro_batch_size, t.global_batch_size = mbs, gbs
                        trial.parallel.tensor_model_parallel_size = tp
                        trial.parallel.pipeline_model_parallel_size = pp
                        trial.parallel.virtual_pipeline_size = vp
                        trial.parallel.data_parallel_size = None
                        trial.parallel.sequence_parallel = sp
                        layers = trial.parallel.pipeline_layers
                        if layers is not None and len(layers) != pp * vp:
                            trial.parallel.pipeline_layers = None
                        try:
                            trial.validate(world_size=world)
                        except ConfigError:
                            continue
                        for rc in recompute:
                            for engine in engines:
                                if engine != "megatron" and (dp == 1 or vp > 1):
                                    continue
                                out.append(Layout(tp, pp, dp, mbs, rc, engine, sp, vp))
    return out


def rank(cfg: Config, seq: int, gbs: int, cluster: Cluster, precision: str = "bf16",
         engines=ENGINES, vocab: int | None = None, overlap: bool = True,
         pipelines=None) -> list[Prediction]:
    """Predictions for every candidate; those that fit first, fastest first (then less memory)."""
    cluster.validate()
    cfg = copy.deepcopy(cfg)
    cfg.model.seq_length = seq
    preds = [predict(cfg, lay, seq, gbs, cluster, vocab, precision, overlap)
             for lay in candidates(cfg, seq, gbs, cluster, engines, pipelines=pipelines)]
    if not preds:
        raise ConfigError(
            f"no layout of {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs passes "
            f"validation for this model with global batch {gbs}: the world size "
            f"{cluster.world} must be a multiple of tensor x pipeline parallel sizes the model "
            f"allows, and the global batch a multiple of micro-batch x data parallel")
    return sorted(preds, key=lambda p: (not p.fits, round(p.step_s, 6), p.layout.engine != "megatron",
                                        p.memory["total"]))


def format_table(preds: list[Prediction], top: int) -> str:
    head = (f"{'#':>3} {'tp':>2} {'pp':>2} {'vp':>2} {'dp':>4} {'mbs':>3} {'recompute':>9} "
            f"{'engine':>8} "
            f"{'sp':>2} | {'weights':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'total GiB':>9} "
            f"| {'step s':>7} {'bubble':>6} {'dp+sh s':>7} {'MFU':>5} {'tok/s':>9} {'balance':>7}  fits")
    lines = [head, "-" * len(head)]
    for i, p in enumerate(preds[:top], 1):
        l, mm = p.layout, p.memory
        engine = l.engine + ("" if l.engine == "megatron" else "*")
        lines.append(
            f"{i:>3} {l.tp:>2} {l.pp:>2} {l.vp:>2} {l.dp:>4} {l.mbs:>3} {l.recompute:>9} "
            f"{engine:>8} "
            f"{'y' if l.sequence_parallel else 'n':>2} | {mm['weights']:7.2f} {mm['grads']:6.2f} "
            f"{mm['optimizer']:6.2f} {mm['activations']:6.2f} {mm['total']:9.2f} | "
            f"{p.step_s:7.3f} {p.parts['bubble']:6.3f} {p.parts['dp'] + p.parts['shared']:7.3f} "
            f"{100 * p.mfu:4.1f}% {p.tokens_per_s:9.0f} {p.stage_balance:7.2f}  "
            f"{'yes' if p.fits else 'NO'}")
    lines.append("* DeepSpeed engine: parallel.engine=deepspeed parallel.zero_stage=1|2|3 "
                 "(docs/engines.md)")
    return "\n".join(lines)


COLUMNS = (
    "columns: tp, pp, dp = tensor, pipeline, data parallel sizes; vp = model chunks per "
    "pipeline stage (interleaved schedule); mbs = micro-batch (sequences); "
    "recompute = activation recomputation; engine = optimizer engine; sp = sequence parallel | "
    "GiB per GPU on the fullest pipeline stage: weights, grads, optim (optimizer state), activ "
    "(activations of the micro-batches in flight), total | step s = predicted step time; "
    "bubble = pipeline idle time in it; dp+sh s = the data-parallel gradient sync that overlap "
    "does not hide, and the shared-layer all-reduce, in it; MFU = model FLOPs / (GPUs x peak); tok/s = tokens per "
    "second, all GPUs; balance = useful fraction of the pipeline cut (1: even); fits = total "
    "within the usable memory")


def layout_overrides(layout: Layout, gbs: int, seq: int, cfg: Config) -> list[str]:
    """`megamor pretrain` options that run `layout` (data parallel follows from the ranks)."""
    out = [f"parallel.tensor_model_parallel_size={layout.tp}",
           f"parallel.pipeline_model_parallel_size={layout.pp}",
           f"train.micro_batch_size={layout.mbs}", f"train.global_batch_size={gbs}",
           f"model.recompute={layout.recompute}"]
    if layout.vp > 1:
        out.append(f"parallel.virtual_pipeline_size={layout.vp}")
    if layout.sequence_parallel:
        out.append("parallel.sequence_parallel=true")
    if layout.engine != "megatron":
        out += ["parallel.engine=deepspeed", f"parallel.zero_stage={layout.engine[-1]}"]
    if seq != cfg.model.seq_length:
        out.append(f"model.seq_length={seq}")
    return out


def sbatch_line(layout: Layout, gbs: int, seq: int, cfg: Config, nodes: int) -> Optional[str]:
    """The same layout as a Slurm job of the preset's script, when there is one."""
    script = f"slurm/pretrain_{cfg.model.preset}.sh"
    if not cfg.model.preset or not (Path(__file__).resolve().parents[1] / script).is_file():
        return None
    env = [f"MEGAMOR_TP={layout.tp}", f"MEGAMOR_PP={layout.pp}", f"MEGAMOR_MBS={layout.mbs}",
           f"MEGAMOR_GBS={gbs}"]
    if layout.engine != "megatron":
        env += ["MEGAMOR_ENGINE=deepspeed", f"MEGAMOR_ZERO_STAGE={layout.engine[-1]}"]
    extra = [f"model.recompute={layout.recompute}"] if layout.recompute != "none" else []
    if layout.vp > 1:
        extra.append(f"parallel.virtual_pipeline_size={layout.vp}")
    if layout.sequence_parallel:
        extra.append("parallel.sequence_parallel=true")
    if seq != cfg.model.seq_length:
        extra.append(f"model.seq_length={seq}")
    return " ".join(env + ["sbatch", f"--nodes={nodes}", script] + extra)


def cmd_plan(args) -> int:
    try:
        overrides = list(args.overrides)
        if args.preset:
            overrides.insert(0, f"model.preset={args.preset}")
        cfg = load_config(args.config, overrides)
        cluster = Cluster(gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                          gpu_memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops,
                          achievable=args.achievable, intra_node_gbs=args.intra_node_gbs,
                          inter_node_gbs=args.inter_node_gbs)
        seq = args.seq or cfg.model.seq_length
        gbs = args.gbs or cfg.train.global_batch_size  # the preset's batch by default
        engines = ENGINES if args.engines == "all" else tuple(args.engines.split(","))
        bad = [e for e in engines if e not in ENGINES]
        if bad:
            raise ConfigError(f"--engines: unknown {', '.join(bad)} (known: {', '.join(ENGINES)}, all)")
        if seq < 1 or gbs < 1:
            raise ConfigError(f"--seq={seq} and --gbs={gbs} must be >= 1")
        pipelines = None
        if args.pp:
            try:
                pipelines = [int(x) for x in args.pp.split(",")]
            except ValueError:
                raise ConfigError(f"--pp={args.pp!r}: a comma-separated list of pipeline sizes")
        preds = rank(cfg, seq, gbs, cluster, args.precision, engines,
                     overlap=not args.no_overlap, pipelines=pipelines)
    except ConfigError as e:
        sys.exit(f"megamor: plan error: {e}")
    m = cfg.model
    print(f"model {m.preset or 'custom'} ({m.arch}, {m.num_layers} unrolled layers, hidden "
          f"{m.hidden_size}), seq {seq}, global batch {gbs} sequences, {args.precision}; "
          f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs of {cluster.gpu_memory_gb:g} GB, "
          f"{cluster.peak_tflops:g} TFLOP/s peak at {100 * cluster.achievable:.0f}% achievable")
    fitting = sum(p.fits for p in preds)
    print(f"{len(preds)} layouts, {fitting} fit in {100 * cluster.usable_memory:.0f}% of GPU memory")
    print(format_table(preds, args.top))
    import textwrap
    print(textwrap.fill(COLUMNS, width=100, subsequent_indent="  "))
    best = preds[0]
    if best.fits:
        print("row 1 as overrides (megamor pretrain, megamor.launch.slurm): "
              + " ".join(layout_overrides(best.layout, gbs, seq, cfg)))
        line = sbatch_line(best.layout, gbs, seq, cfg, cluster.nodes)
        if line:
            print(f"row 1 as a Slurm job: {line}")
    if not fitting:
        print("no layout fits: more GPUs, a smaller micro-batch, recompute=full or a shorter "
              "sequence", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub) -> None:
    d = Cluster()
    p = sub.add_parser("plan", help="predict memory and step time of parallel layouts, ranked",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", help="model preset (model.preset=...)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--gbs", type=int, default=None,
                   help="global batch, sequences (default: the config's train.global_batch_size; "
                        "256 for the paper presets)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--engines", default="megatron",
                   help="megatron (the default engine), or a list with the DeepSpeed engine's "
                        "zero1,zero2,zero3, or all")
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--gpu-memory-gb", type=float, default=d.gpu_memory_gb)
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops)
    p.add_argument("--achievable", type=float, default=d.achievable,
                   help="fraction of peak the matmuls reach")
    p.add_argument("--intra-node-gbs", type=float, default=d.intra_node_gbs)
    p.add_argument("--inter-node-gbs", type=float, default=d.inter_node_gbs)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--pp", default=None,
                   help="only these pipeline sizes, comma-separated (e.g. 8: compare its cuts "
                        "and virtual pipeline sizes)")
    p.add_argument("--no-overlap", action="store_true",
                   help="charge the data-parallel gradient sync in full, as for a run with "
                        "parallel.overlap_grad_reduce=false overlap_param_gather=false")
    p.add_argument("overrides", nargs="*", help="section.option=value")
    p.set_defaults(fn=cmd_plan)
