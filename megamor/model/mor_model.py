"""The MoR language model: one pipeline stage of the unrolled network, built from megatron specs.

A stage holds the unique layers its slice of the unrolled plan uses (copies of shared layers may
live on several stages; `megamor.parallel` keeps them identical), the routers of the steps that
start on it, and the embedding / final norm + tied output layer on the first / last stage.

Batch flow through one stage (hidden states [s, b, h]):
  tokens -> embedding (first stage)  |  unpack the wire tensor from the previous stage
  for each unrolled layer of the stage:
      first layer of step r: route (expert-choice top-k among step r-1's survivors, or
                             token-choice depth >= r), gather the active tokens -> [k, b, h]
      layer (megatron TransformerLayer) on the gathered tokens, causal among them, RoPE at their
                             original positions
      last layer of step r:  scatter back: H^{r+1} = H^r + g * f(H^r) for the processed tokens
  final norm -> tied output layer -> per-token loss (last stage)  |  pack the wire tensor

The wire tensor of a routed model is [s, b, 2h + 2] = [x | base | active | gate] so that a stage
boundary may fall anywhere, even inside a recursion step (see docs/architecture.md).

Under sequence parallelism every [s, b, ...] tensor above (hidden states, routing state, wire) is
this tensor-parallel rank's slice [s/tp, b, ...]; routers decide on the whole sequence's scores
and gathered sets are sharded over their own token dimension (`routing.SequenceShards`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megamor.config import ModelConfig, RoutingConfig
from megamor.model import fp8
from megamor.layout import Plan
from megamor.model.attention import AttentionCall, Rotary
from megamor.model.wire import fold_wire, unfold_wire
from megamor.model.routing import WHOLE, ActiveSet, AttachAuxLoss, SequenceShards, balancing_loss, z_loss

# Seed tags: every parameter set is initialised from its own seed, so a unique layer gets the
# same weights on every stage that holds a copy, and every parallel layout starts from the
# weights of the single-process model.
_TAG_EMBEDDING = 0
_TAG_FINAL_NORM = 1
_TAG_ROUTER = 100
_TAG_LAYER = 1000

# Router statistics that are means per micro-batch (the others are token counts, summed).
MEAN_STATS = ("aux_loss", "sampling_acc", "balance_loss", "z_loss")


def dead_token_ratios(position_counts: Tensor, num_sequences: int) -> dict[str, float]:
    """Dead-token ratios of one logging window (definition and source: docs/tracking.md).

    position_counts [N_r, T]: row r-1 counts, for each sequence position t, how many of the
    window's `num_sequences` sequences had their token at t selected by recursion step r (summed
    over micro-batches, data-parallel ranks and optimizer steps). Within one sequence an
    expert-choice step keeps exactly its capacity's share of tokens, so what can die is a
    position that the routers never pick, whatever the text there.

    router/stepR/dead_token_ratio (R >= 2): fraction of the T positions never selected at step R.
    router/dead_token_ratio: fraction never selected past step 1 (at no step R >= 2).
    router/dead_token_ratio_chance: the dead-token ratio if every sequence had picked the same
    number of step-2 tokens uniformly at random, (1 - f)^n with f the window's selected fraction
    at step 2 and n its sequences: the ratio to compare with (1 - capacity when n = 1).
    """
    pc = position_counts.double()
    n_steps, t = pc.shape
    out = {f"router/step{r}/dead_token_ratio": float((pc[r - 1] == 0).sum()) / t
           for r in range(2, n_steps + 1)}
    out["router/dead_token_ratio"] = float((pc[1:].sum(0) == 0).sum()) / t
    f = float(pc[1].sum()) / (num_sequences * t) if n_steps > 1 and num_sequences else 0.0
    out["router/dead_token_ratio_chance"] = (1.0 - f) ** num_sequences
    return out


def fp8_row_multiple(config: TransformerConfig) -> int:
    """Rows (tokens) an FP8 GEMM input must be a multiple of: 16 for Hopper FP8 recipes
    (Transformer Engine asserts otherwise), 32 for MXFP8's 1x32 scaling blocks; 1 without FP8."""
    if not config.fp8:
        return 1
    return 32 if str(getattr(config.fp8_recipe, "value", config.fp8_recipe)) == "mxfp8" else 16


def sequence_multiple(config: TransformerConfig) -> int:
    """What a full-length sequence of a batch of one must be a multiple of: the FP8 GEMM rows
    (`fp8_row_multiple`), per tensor-parallel rank under sequence parallelism (each rank holds
    s / tp rows)."""
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return fp8_row_multiple(config) * tp


def fp8_padded(ids: list[int], config: TransformerConfig, pad_id: int = 0) -> list[int]:
    """`ids` of one sequence padded at the end to the rows FP8 GEMMs need (a full-length layer
    of a batch of one sees len(ids) rows), and to equal sequence-parallel slices
    (`sequence_multiple`): for forward passes of any length, such as depth maps. Under
    threshold (inference) routing and causal attention the padding changes nothing for the
    tokens before it."""
    return list(ids) + [pad_id] * (-len(ids) % sequence_multiple(config))


@contextlib.contextmanager
def seeded(seed: int, tag: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed * 100003 + tag)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


class StageState:
    """Routing state carried through the unrolled layers (and across stage boundaries)."""

    def __init__(self, x: Tensor, base: Tensor, active: Tensor, gate: Tensor):
        self.x, self.base, self.active, self.gate = x, base, active, gate
        self.tokens: Optional[ActiveSet] = None  # gathered set of the current step
        self.xg: Optional[Tensor] = None  # running activations of the gathered tokens
        self.mask = self.mask_to_full = self.rope = None  # the current step's, shared by its layers

    def pack(self) -> Tensor:
        x = self.x if self.xg is None else self.tokens.scatter(self.x, self.xg)
        return torch.cat([x, self.base, self.active.unsqueeze(-1), self.gate.unsqueeze(-1)], -1)

    @classmethod
    def unpack(cls, wire: Tensor, h: int) -> "StageState":
        return cls(wire[..., :h], wire[..., h:2 * h], wire[..., 2 * h], wire[..., 2 * h + 1])


class UniqueLayers(nn.ModuleDict):
    """The stage's unique layers, keyed by unique index (the same key on every stage).

    Its sharded state dict names layer u `layers.u.*` whatever the layout, and marks copies that
    an earlier stage also holds as replicas, so a checkpoint stores each shared layer once and any
    pipeline layout can load it.
    """

    def __init__(self, copy_index: dict[int, int]):
        super().__init__()
        self.copy_index = copy_index

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        out = {}
        for u, layer in self.items():
            sd = layer.sharded_state_dict(f"{prefix}{u}.", sharded_offsets, metadata)
            copy = self.copy_index.get(int(u), 0)
            if copy:
                for sh in sd.values():
                    rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
                    sh.replica_id = (rid[0] + 100 * copy,) + tuple(rid[1:])
            out.update(sd)
        return out


@dataclass
class MoRStageSubmodules:
    """Slots of one pipeline stage (MoRModel): its unrolled layers, its routers, its final norm
    (filled by `megamor.model.specs.stage_spec`)."""

    layer: Union[ModuleSpec, type]
    router: Union[ModuleSpec, type] = IdentityOp
    final_layernorm: Union[ModuleSpec, type] = IdentityOp


class MoRModel(LanguageModule):
    """One pipeline stage of a vanilla, recursive or MoR language model."""

    def __init__(self, config: TransformerConfig, submodules: MoRStageSubmodules,
                 model_cfg: ModelConfig, routing_cfg: RoutingConfig, plan: Plan,
                 stage: tuple[int, int], vocab_size: int, pre_process: bool, post_process: bool,
                 seed: int, dp_group=None, layer_copy_index: Optional[dict[int, int]] = None,
                 packed_sets: bool = False, shared_layers: Optional[dict] = None,
                 vp_stage: Optional[int] = None):
        super().__init__(config=config)
        # Virtual pipeline: this chunk's index on its stage (megatron's Float16Module and
        # schedule read it), the layers an earlier chunk of the stage built (shared, not
        # rebuilt), and the wire folded into megatron's [s', b, hidden] send shape.
        self.vp_stage = vp_stage
        shared_layers = shared_layers or {}
        self.mcfg, self.rcfg, self.plan = model_cfg, routing_cfg, plan
        self.start, self.stop = stage
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = vocab_size
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = True
        self.routed = model_cfg.arch == "mor"
        self.kv_sharing = model_cfg.kv_sharing
        self.dp_group = dp_group
        self.capacities = routing_cfg.capacities(model_cfg.num_recursions)
        self.input_tensor = None
        self.trace_routing = False
        self.aux_loss_scale = 1.0  # 1 / num_microbatches, set by the trainer
        # Gathered token sets: THD-packed (varlen attention kernels) or padded; rows padded to
        # what FP8 GEMMs need.
        self.packed_sets = packed_sets
        self.row_multiple = model_cfg.token_pad_multiple or fp8_row_multiple(config)
        # Sequence parallelism: this rank's slice of the sequence (WHOLE without it).
        sp = config.sequence_parallel and self.tp_group.size() > 1
        self.shards = SequenceShards(self.tp_group) if sp else WHOLE
        self.recompute, self.recompute_unit = model_cfg.recompute, model_cfg.recompute_unit
        h = config.hidden_size
        self.wire_channels = 2 * h + 2 if self.routed else h
        # megatron's interleaved schedule sends [s', b, hidden] only: a wider wire travels folded
        # (megamor.model.wire).
        self.wire_folded = vp_stage is not None and self.wire_channels != h

        if pre_process:
            with seeded(seed, _TAG_EMBEDDING):
                self.embedding = LanguageModelEmbedding(
                    config=config, vocab_size=vocab_size,
                    max_sequence_length=model_cfg.seq_length, position_embedding_type="rope")
        self.layers = UniqueLayers(layer_copy_index or {})
        for u in plan.unique_layers_in(self.start, self.stop):
            if u in shared_layers:
                self.layers[str(u)] = shared_layers[u]
                continue
            at = {} if vp_stage is None else {"vp_stage": vp_stage}
            with seeded(seed, _TAG_LAYER + u):
                self.layers[str(u)] = build_module(submodules.layer, config=config,
                                                   layer_number=u + 1, **at)
        self.routers = nn.ModuleDict()
        if self.routed:
            for l in plan.layers[self.start:self.stop]:
                if not l.first_in_step:
                    continue
                if routing_cfg.type == "expert_choice":
                    with seeded(seed, _TAG_ROUTER + l.step):
                        self.routers[str(l.step)] = build_module(submodules.router, hidden_size=h)
                elif l.step == 1:
                    with seeded(seed, _TAG_ROUTER):
                        self.routers["1"] = build_module(submodules.router, hidden_size=h)
            # Replicated over tensor parallel but, under sequence parallelism, each copy sees its
            # rank's tokens only: megatron's finalize_model_grads sums the gradients of
            # parameters flagged `sequence_parallel` over tensor parallel (as its norms' and MoE
            # router's).
            for p in self.routers.parameters():
                setattr(p, "sequence_parallel", config.sequence_parallel)
        if post_process:
            with seeded(seed, _TAG_FINAL_NORM):
                self.final_norm = build_module(submodules.final_layernorm, config=config,
                                               hidden_size=h, eps=config.layernorm_epsilon)
            with seeded(seed, _TAG_EMBEDDING):  # same draw as the embedding: tied copies agree
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    h, vocab_size, config=config, init_method=config.init_method, bias=False,
                    skip_bias_add=False, gather_output=False,
                    skip_weight_param_allocation=pre_process)
        self.segments = self._segments()  # static: fixed by the plan and this stage's range
        # Set by an engine that keeps the shared block's weights gathered over the recursion
        # loop (ZeRO-3): enter(x) before the first recursion step, exit(x) after the last.
        self.recursion_scope = None
        loops = [i for i, seg in enumerate(self.segments) if seg[0].step > 0]
        self._loop_span = (loops[0], loops[-1]) if loops else None
        self._tie_embeddings()
        self.reset_stats()

    # -------------------------------------------------------------- megatron plumbing

    def _tie_embeddings(self) -> None:
        """Mark the tied embedding / output weights.

        The last stage's copy already equals the first stage's (same seeded draw), so unlike
        `LanguageModule.setup_embeddings_and_output_layer` no start-up all-reduce is needed. Its
        gradient is summed with the first stage's by `parallel.allreduce_shared_grads`, like any
        shared-layer copy (which also gives it a gradient bucket of its own).
        """
        if self.pre_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        if self.config.pipeline_model_parallel_size == 1:
            self.shared_embedding_or_output_weight().zero_out_wgrad = True
        elif self.post_process and not self.pre_process:
            self.output_layer.weight.shared = True  # counted once in the gradient norm

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    @property
    def parts(self) -> list["MoRModel"]:
        """The MoRModels of this stage (itself; a VirtualStage has one per chunk)."""
        return [self]

    def reset_stats(self) -> None:
        # Host-side counters, summed over micro-batches until the trainer reads them.
        self.token_counts: dict[int, float] = {}  # unrolled layer index -> tokens processed
        self.stats: dict[str, Tensor] = {}
        # recursion step -> [s] how many sequences had their token at each position selected at
        # that step (summed over the batch). For the dead-token ratio (`dead_token_ratios`).
        self.position_counts: dict[int, Tensor] = {}
        # Routing decisions of the last forward, when `trace_routing` is set: step -> [s, b]
        # active mask (expert-choice) or depth (token-choice). For depth maps.
        self.routing_trace: dict[int, Tensor] = {}

    def stat_keys(self) -> list[str]:
        """Names of every router statistic of the whole model (any stage may hold any of them),
        so that all ranks reduce the same vector."""
        m, r = self.mcfg, self.rcfg
        if not self.routed:
            return []
        steps = range(1, m.num_recursions + 1)
        if r.type == "expert_choice":
            return [f"router/step{s}/{k}" for s in steps
                    for k in ("selected", "reached", "aux_loss", "sampling_acc")]
        keys = [f"router/depth{i}/tokens" for i in steps]
        if r.balancing == "loss":
            keys.append("router/balance_loss")
        if r.z_loss_weight:
            keys.append("router/z_loss")
        return keys

    def _stat(self, key: str, value: Tensor) -> None:
        v = value.detach().float()
        self.stats[key] = self.stats[key] + v if key in self.stats else v

    def _count_positions(self, step: int, mask: Tensor) -> None:
        """Training statistic (dead-token windows); inference forwards of any length skip it."""
        if not self.training:
            return
        c = mask.detach().sum(1).float()  # [s, b] -> [s]
        pc = self.position_counts
        pc[step] = pc[step] + c if step in pc else c

    def _attach(self, x: Tensor, loss: Tensor, weight: float) -> Tensor:
        if weight == 0 or not (self.training and torch.is_grad_enabled()):
            return x
        return AttachAuxLoss.apply(x, loss, weight * self.aux_loss_scale)

    # -------------------------------------------------------------- forward

    def forward(self, input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tensor:
        """First stage: input_ids [b, s]. Last stage: returns per-token loss [b, s] if labels are
        given, else logits [s, b, v/tp]. Other stages: the wire tensor for the next stage."""
        h = self.config.hidden_size
        if self.pre_process:
            x = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
            s, b = x.shape[0], x.shape[1]
            ones = x.new_ones(s, b)
            state = StageState(x, x, ones, x.new_zeros(s, b))
        else:
            wire = self.input_tensor
            if self.wire_folded:
                wire = unfold_wire(wire, self.wire_channels)
            state = StageState.unpack(wire, h) if self.routed else StageState(wire, wire, None, None)
        # The whole sequence's length (this rank holds s / tp of it under sequence parallelism).
        s, b = state.x.shape[0] * self.shards.size, state.x.shape[1]
        # RoPE cos/sin of the full sequence: once per forward, for every full-length layer.
        full_rope = Rotary(torch.arange(s, device=state.x.device), self.mcfg.head_dim,
                           self.mcfg.rotary_base)
        kv_store: dict = {}
        scope = self.recursion_scope if self._loop_span else None
        # As megatron's TransformerBlock: under sequence parallelism the layers run in the
        # tensor-parallel RNG stream (dropout of sharded activations differs per rank).
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel
               else contextlib.nullcontext())
        # Delayed scaling: one FP8 context (an empty virtual-pipeline chunk has no layers, and
        # no amax history to reduce).
        context = fp8.forward_context(self.config) if self.segments else contextlib.nullcontext()
        with rng, context:
            state = self._run_segments(state, s, b, full_rope, kv_store, scope)
        for layer in self.layers.values():
            layer.self_attention.call = None
        if not self.post_process:
            out = state.pack() if self.routed else state.x
            if out is self.input_tensor:  # an empty chunk: megatron may free what it sends
                out = out.clone()
            return fold_wire(out, h) if self.wire_folded else out
        x = state.x if state.xg is None else state.tokens.scatter(state.x, state.xg)
        x = self.final_norm(x)
        logits, _ = self.output_layer(x, weight=self.shared_embedding_or_output_weight())
        if labels is None:
            return logits
        return self.compute_language_model_loss(labels, logits)  # [b, s]

    def _run_segments(self, state: StageState, s: int, b: int, full_rope: Rotary, kv_store: dict,
                      scope) -> StageState:
        """The stage's unrolled layers, segment by segment (routing, gather, layers, scatter)."""
        for i, seg in enumerate(self.segments):
            if scope is not None and i == self._loop_span[0]:
                state.x = scope.enter(state.x)
            if scope is not None and i == self._loop_span[1] + 1:
                state.x = scope.exit(state.x)
            step = seg[0].step
            if not self.routed or step == 0:  # full sequence: causal, no mask tensor
                calls = [self._attention_call(l, kv_store, False, full_rope, full_rope) for l in seg]
                state.x = self._run(seg, calls, state.x, None)
                if self.routed:
                    state.base = state.x
                for l in seg:
                    self.token_counts[l.index] = self.token_counts.get(l.index, 0.0) + s * b
                continue
            if seg[0].first_in_step:
                self._begin_step(state, step)
            elif state.tokens is None:  # this stage starts inside a step: re-gather
                self._gather(state, step)
            tok = state.tokens
            calls = [self._attention_call(l, kv_store, tok.packed, state.rope, full_rope) for l in seg]
            # KV-sharing reads: queries of this set, keys of every position (explicit mask).
            mask = state.mask_to_full if calls[0].kv_mode == "read" else None
            state.xg = self._run(seg, calls, state.xg, mask, tok.packed_seq_params)
            for l in seg:
                self.token_counts[l.index] = self.token_counts.get(l.index, 0.0) + tok.num_tokens
            if seg[-1].last_in_step:
                self._end_step(state, step)
        if scope is not None and self._loop_span[1] == len(self.segments) - 1:
            state.x = scope.exit(state.x)
        return state

    # -------------------------------------------------------------- running layers

    def _segments(self) -> list[list]:
        """The stage's unrolled layers in runs that share one input set: the layers of one
        recursion step (step > 0), each other layer alone. A segment is the unit of
        `recompute_unit=step`."""
        segs: list[list] = []
        for l in self.plan.layers[self.start:self.stop]:
            if segs and l.step > 0 and segs[-1][-1].step == l.step and not l.first_in_step:
                segs[-1].append(l)
            else:
                segs.append([l])
        return segs

    def _run(self, seg, calls, x: Tensor, mask, packed_seq_params=None) -> Tensor:
        """Run a segment's layers as megatron's TransformerBlock runs its layers: each inside
        megatron's FP8 context for its (unrolled, global) layer number (megamor.model.fp8: FP8
        contexts and weight-cast flags of shared layers), under full activation recompute per
        layer or per segment when configured."""

        def one(l, call):
            layer = self.layers[str(l.unique)]

            def fn(x):
                layer.self_attention.call = call  # set inside: recompute runs it again
                with fp8.layer_context(self.config, l.index, layer):
                    return layer(hidden_states=x, attention_mask=mask,
                                 packed_seq_params=packed_seq_params)[0]
            return fn

        fns = [one(l, c) for l, c in zip(seg, calls)]
        if self.recompute != "full" or not (self.training and torch.is_grad_enabled()):
            for fn in fns:
                x = fn(x)
            return x
        if self.recompute_unit == "layer":
            for fn in fns:
                x = self._checkpoint(fn, x)
            return x

        def all_of_them(x):
            for fn in fns:
                x = fn(x)
            return x
        return self._checkpoint(all_of_them, x)

    def _checkpoint(self, fn, x: Tensor) -> Tensor:
        """Full recompute of `fn(x)`: megatron's checkpoint (TE's under FP8, as TransformerBlock
        does, so that FP8 scaling state is handled on the recompute)."""
        if self.config.fp8:
            from megatron.core.extensions.transformer_engine import te_checkpoint
            from megatron.core import parallel_state
            return te_checkpoint(fn, False, tensor_parallel.random.get_cuda_rng_tracker,
                                 parallel_state.get_tensor_model_parallel_group(), x)
        return tensor_parallel.checkpoint(fn, False, x)

    def _attention_call(self, l, store: dict, packed: bool, rotary: Rotary,
                        full_rotary: Rotary) -> AttentionCall:
        """How layer `l` attends in this call: mask type, KV sharing, RoPE of queries and keys."""
        mode = "off"
        if self.kv_sharing and l.step > 0:
            mode = "write" if l.step == 1 else "read"
        if mode == "read" and self.routed:
            mask_type = AttnMaskType.arbitrary  # a subset of queries against all positions
        elif packed:
            mask_type = AttnMaskType.padding_causal  # THD: causal within each sequence
        else:
            mask_type = AttnMaskType.causal
        return AttentionCall(mask_type=mask_type, kv_mode=mode, slot=l.slot, store=store,
                             q_rotary=rotary, k_rotary=full_rotary if mode == "read" else rotary)

    def _gather(self, state: StageState, step: int, active: Optional[Tensor] = None) -> None:
        """Gather step `step`'s active tokens, with the RoPE angles (and KV-sharing mask) its
        layers share. `active`: the whole sequence's routing state when the caller has it
        (else gathered from this rank's slice under sequence parallelism)."""
        tok = self._active_set(state.active if active is None else active, step, active is not None)
        state.tokens, state.xg = tok, tok.gather(state.x)
        state.mask_to_full = tok.attention_mask_to_full() if self.kv_sharing else None
        state.rope = Rotary(tok.positions(), self.mcfg.head_dim, self.mcfg.rotary_base)

    def _active_set(self, active: Tensor, step: int, whole: bool = False) -> ActiveSet:
        if not whole:
            active = self.shards.full(active)
        if self.rcfg.type == "expert_choice":
            mask = active > 0.5
        else:
            mask = active >= step - 0.5
        # KV sharing reads step 1's keys in the padded layout (its mask relates queries to
        # positions); step 1 (all tokens) is dense either way.
        packed = self.packed_sets and not self.kv_sharing
        return ActiveSet.from_mask(mask, self.row_multiple, packed, self.shards)

    def _begin_step(self, state: StageState, step: int) -> None:
        """Route at the first layer of step `step` and gather its tokens. Decisions, statistics
        and traces are the whole sequence's (identical on every tensor-parallel rank); the
        routing state kept in `state` is this rank's rows."""
        x, sh = state.x, self.shards
        if self.rcfg.type == "expert_choice":
            router = self.routers[str(step)]
            reached = sh.full(state.active) > 0.5
            selected, gate, aux, st = router(x, reached, self.capacities[step - 1],
                                         not self.training, sh)
            for k, v in st.items():
                self._stat(f"router/step{step}/{k}", v)
            self._count_positions(step, selected)
            x = self._attach(x, aux, self.rcfg.aux_loss_weight)
            whole = selected.to(x.dtype)
            mine = sh.local(whole)
            state.x = state.base = x
            state.active = mine
            state.gate = (gate * mine).to(x.dtype)  # fp32 router, activations' dtype
        elif step == 1:
            router = self.routers["1"]
            depth, gate, probs, logits, counts = router(x, self.rcfg.balancing == "loss_free", sh)
            loss = x.new_zeros(())
            if self.rcfg.balancing == "loss":
                bal = balancing_loss(probs, counts, self.mcfg.num_recursions, self.dp_group, sh)
                loss = loss + self.rcfg.balance_loss_weight * bal
                self._stat("router/balance_loss", bal)
            if self.rcfg.z_loss_weight:
                zl = z_loss(logits, sh)
                loss = loss + self.rcfg.z_loss_weight * zl
                self._stat("router/z_loss", zl)
            x = self._attach(x, loss, 1.0)
            whole = sh.full(depth).to(x.dtype)
            for i in range(self.mcfg.num_recursions):
                self._stat(f"router/depth{i + 1}/tokens", counts[i])
                self._count_positions(i + 1, whole >= i + 1)  # step r runs depths >= r
            state.x = state.base = x
            state.active = depth.to(x.dtype)
            state.gate = gate.to(x.dtype)  # fp32 router, activations' dtype
        else:
            whole = None  # token-choice, later steps: the depths decided at step 1
        self._gather(state, step, whole)
        if self.trace_routing:
            self.routing_trace[step] = (sh.full(state.active) if whole is None else whole).detach().clone()

    def _end_step(self, state: StageState, step: int) -> None:
        """Scatter the step's result back, row by row of the processed tokens (this rank's under
        sequence parallelism)."""
        tok = state.tokens
        y = tok.set_rows(state.xg)  # [n, h]
        g = tok.own_rows(state.gate.unsqueeze(-1))  # [n, 1]
        base = tok.own_rows(state.base)
        if self.rcfg.type == "expert_choice":
            # H^{r+1} = H^r + g * f(H^r) for the selected tokens, H^r for the others.
            state.x = tok.put(state.base, base + g * y)
            state.base = state.x
        else:
            # Token-choice: the exit step adds the gated output onto H^1; earlier steps carry
            # the ungated (or, with gate_every_step, gated) block output.
            d = tok.own_rows(state.active.unsqueeze(-1))
            cont = g * y if self.rcfg.gate_every_step else y
            upd = torch.where((d - step).abs() < 0.5, base + g * y, cont)
            state.x = tok.put(state.x, upd)
        state.tokens, state.xg = None, None

    # -------------------------------------------------------------- routing state updates

    def update_router_bias(self) -> None:
        """Loss-free balancing: called once after every optimizer step."""
        if self.routed and self.rcfg.type == "token_choice" and self.rcfg.balancing == "loss_free":
            if "1" in self.routers:
                self.routers["1"].update_bias(self.rcfg.bias_update_rate, self.dp_group)
