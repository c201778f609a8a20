"""GPU-path decisions pinned on CPU: the spec tree each backend builds, the attention mask type
and layout of every layer call, what runs inside megatron's FP8 context, the row padding FP8
GEMMs need, and activation recomputation. (CI has no GPU: these are what keeps the H100 path
honest.) Single process, no launcher."""

import contextlib
import dataclasses
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

from megatron.core import fp8_utils
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from megamor.config import ConfigError, load_config
from megamor.model.attention import SDPAttention, packed_causal_mask
from megamor.model.routing import ActiveSet
from megamor.model.specs import TorchRMSNorm, stage_spec
from single_process import BATCH, SEQ, make_model, tokens, world_of_one  # noqa: F401 (fixture)

# ----------------------------------------------------------------------------- the spec tree


def _shape(spec):
    """The slot structure of a spec tree (slot names, recursively), without the providers."""
    if isinstance(spec, ModuleSpec):
        sub = spec.submodules
        if dataclasses.is_dataclass(sub):
            return {f.name: _shape(getattr(sub, f.name)) for f in dataclasses.fields(sub)
                    if not f.name.startswith("sharded")}
        return "leaf"
    return "leaf"


def test_local_and_te_build_the_same_tree_from_their_providers():
    cfg = load_config(None, ["model.arch=mor"])
    local, te = stage_spec("local", cfg.model, cfg.routing), stage_spec("te", cfg.model, cfg.routing)
    assert _shape(local) == _shape(te)
    ll, tl = local.submodules.layer.submodules, te.submodules.layer.submodules
    # The final norm comes from the provider: TENorm under TE (the layer's input_layernorm slot
    # there is IdentityOp, because TE fuses that norm into the QKV linear).
    # (Without TE installed megatron still defines these names, as placeholders: compare identity.)
    from megatron.core.extensions import transformer_engine as mte
    assert te.submodules.final_layernorm is mte.TENorm
    assert tl.input_layernorm is IdentityOp and tl.pre_mlp_layernorm is IdentityOp
    assert tl.self_attention.submodules.linear_qkv is mte.TELayerNormColumnParallelLinear
    assert tl.mlp.submodules.linear_fc1 is mte.TELayerNormColumnParallelLinear
    assert tl.self_attention.submodules.core_attention is mte.TEDotProductAttention
    assert tl.self_attention.submodules.linear_proj is mte.TERowParallelLinear
    # Local: torch's RMSNorm (megatron's WrappedTorchNorm, which refuses sequence parallelism;
    # megamor's TorchRMSNorm builds it, and the flagged norm under SP).
    assert local.submodules.final_layernorm is TorchRMSNorm
    assert ll.input_layernorm is local.submodules.final_layernorm
    assert ll.self_attention.submodules.core_attention is SDPAttention
    # One checkpoint format: the local norms are saved under TE's fused names.
    assert ll.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    assert tl.sharded_state_dict_keys_map == {}
    assert local.submodules.router.module.__name__ == "ExpertChoiceRouter"
    vanilla = load_config(None, ["model.arch=vanilla"])
    assert stage_spec("te", vanilla.model, vanilla.routing).submodules.router is IdentityOp


def test_the_built_stage_is_the_spec_tree():
    model = make_model("model.arch=mor")
    assert isinstance(model.final_norm, torch.nn.RMSNorm)  # megatron's WrappedTorchNorm
    assert "final_norm.weight" in model.sharded_state_dict()
    assert all(type(l.self_attention.core_attention) is SDPAttention for l in model.layers.values())
    assert sorted(model.routers) == ["1", "2", "3"]


# ----------------------------------------------------------------------------- attention calls


def _record_attention(model):
    seen = []
    for u, layer in model.layers.items():
        def hook(mod, args, kwargs, u=u):
            seen.append((u, mod.call.mask_type, kwargs.get("attention_mask", args[1] if len(args) > 1 else None),
                         kwargs.get("packed_seq_params")))
        layer.self_attention.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("kind", ["vanilla", "expert", "token_padded", "token_packed", "kv_share"])
def test_mask_type_and_layout_of_every_layer_call(kind):
    over = {"vanilla": ["model.arch=vanilla"], "expert": ["model.arch=mor"],
            "token_padded": ["model.arch=mor", "routing.type=token_choice"],
            "token_packed": ["model.arch=mor", "routing.type=token_choice",
                             "model.varlen_attention=packed"],
            "kv_share": ["model.arch=mor", "model.kv_sharing=true"]}[kind]
    model = make_model(*over)
    seen = _record_attention(model)
    model.train()
    model(input_ids=tokens(), labels=tokens(1))
    assert len(seen) == 8
    for i, (u, mask_type, mask, packed) in enumerate(seen):
        full_length = i in (0, 7) or kind == "vanilla"
        if kind == "kv_share" and i >= 3 and not full_length:  # steps 2, 3 read step 1's K/V
            assert mask_type == AttnMaskType.arbitrary and mask is not None
        elif kind == "token_packed" and not full_length:
            assert mask_type == AttnMaskType.padding_causal and mask is None
            assert packed is not None and packed.qkv_format == "thd"
        else:
            # No materialised mask: TE's flash / fused kernels, SDPA's causal kernel.
            assert mask_type == AttnMaskType.causal and mask is None and packed is None, (i, kind)


def test_sdpa_paths_equal_the_explicit_mask_path():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    model = make_model("model.arch=mor")
    cfg = model.config
    sdpa = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")  # megatron's unfused kernel
    g = torch.Generator().manual_seed(0)
    s, b, d = 20, 3, cfg.kv_channels
    q = torch.randn(s, b, cfg.num_attention_heads, d, generator=g)
    k = torch.randn(s, b, cfg.num_query_groups, d, generator=g)
    v = torch.randn(s, b, cfg.num_query_groups, d, generator=g)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s)
    want = ref(q, k, v, causal)
    assert (sdpa(q, k, v, None) - want).abs().max() < 1e-5  # causal kernel, no mask
    assert (sdpa(q, k, v, causal, attn_mask_type=AttnMaskType.arbitrary) - want).abs().max() < 1e-5
    # Padded gathered sets: causal attention alone gives the real tokens what the explicit
    # padding mask gives them.
    mask = torch.rand(s, b, generator=g) < 0.5
    mask[0] = True
    tok = ActiveSet(mask)
    qg, kg, vg = (tok.gather(x.flatten(2)).view(-1, b, x.shape[2], d) for x in (q, k, v))
    explicit = ref(qg, kg, vg, tok.attention_mask())
    plain = sdpa(qg, kg, vg, None)
    assert (plain - explicit)[tok.valid].abs().max() < 1e-5
    # Packed (THD): the same rows as the padded layout.
    pk = ActiveSet(mask, packed=True)
    qp, kp, vp = (pk.gather(x.flatten(2)).view(-1, x.shape[2], d) for x in (q, k, v))
    out = sdpa(qp, kp, vp, None, attn_mask_type=AttnMaskType.padding_causal,
               packed_seq_params=pk.packed_seq_params)
    back = pk.scatter(torch.zeros(s, b, out.shape[-1]), out)
    assert (back - tok.scatter(torch.zeros_like(back), plain)).abs().max() < 1e-5
    assert packed_causal_mask(torch.tensor([0, 2, 3]), 3).tolist() == [
        [True, False, False], [True, True, False], [False, False, True]]


# ----------------------------------------------------------------------------- FP8 context


class RecordingFp8Context:
    """Stands in for megatron's fp8_utils.get_fp8_context (the real one needs TE)."""

    def __init__(self):
        self.active, self.entered = None, []

    def __call__(self, config, layer_no=-1, is_init=False):
        assert config.fp8 and not is_init
        rec = self

        @contextlib.contextmanager
        def ctx():
            rec.active = layer_no
            rec.entered.append(layer_no)
            try:
                yield
            finally:
                rec.active = None
        return ctx()


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_every_layer_forward_runs_inside_megatrons_fp8_context(monkeypatch, recompute):
    from megatron.core import tensor_parallel
    from megatron.core.extensions import transformer_engine as mte

    rec = RecordingFp8Context()
    monkeypatch.setattr(fp8_utils, "get_fp8_context", rec)
    te_checkpoints = []

    def te_checkpoint(fn, distribute, rng_tracker, tp_group, *args):  # TE's, recorded
        te_checkpoints.append(len(args))
        return tensor_parallel.checkpoint(fn, distribute, *args)
    monkeypatch.setattr(mte, "te_checkpoint", te_checkpoint)
    model = make_model("model.arch=mor", "train.precision=fp8", f"model.recompute={recompute}",
                       fp8=True)
    inside, outside, routed = [], [], set()
    for layer in model.layers.values():
        layer.register_forward_pre_hook(lambda *a: inside.append(rec.active))
    for name, router in model.routers.items():
        router.register_forward_pre_hook(lambda *a: outside.append(rec.active))
        # Called as a module: megatron waits for a bucket's parameter all-gather in forward
        # pre-hooks (overlap_param_gather), so a router used any other way reads stale weights.
        router.register_forward_pre_hook(lambda *a, n=name: routed.add(n))
    model.output_layer.register_forward_pre_hook(lambda *a: outside.append(rec.active))
    model.train()
    model(input_ids=tokens(), labels=tokens(1)).mean().backward()
    # Each of the 6 FP8 unrolled layer calls inside the context of its own global layer number
    # (recompute runs them again in backward, inside the context again); the bf16 edge layers
    # (train.fp8_bf16_layers=1: unrolled layers 0 and 7) outside any.
    times = 2 if recompute == "full" else 1
    calls = list(range(1, 7)) * times
    assert sorted(a for a in inside if a is not None) == sorted(calls)
    assert inside.count(None) == 2 * times and sorted(rec.entered) == sorted(calls)
    assert outside and all(a is None for a in outside)  # routers, output layer: never FP8
    assert routed == set(model.routers) and len(routed) == 3  # each routed step's router
    # Under FP8 full recompute goes through TE's checkpoint, as in megatron's TransformerBlock.
    assert te_checkpoints == ([1] * 8 if recompute == "full" else [])
    # megatron keeps the first and last unrolled layers in bf16 (train.fp8_bf16_layers=1).
    tcfg = model.config
    assert [fp8_utils.is_first_last_bf16_layer(tcfg, i) for i in range(8)] == \
        [True] + [False] * 6 + [True]
    assert tcfg.fp8 == "hybrid" and tcfg.fp8_recipe == "tensorwise"


def test_fp8_options_are_validated():
    with pytest.raises(ConfigError, match="fp8_recipe=delayed cannot keep layers in bf16"):
        load_config(None, ["train.precision=fp8", "train.fp8_recipe=delayed"]).validate(1)
    load_config(None, ["train.precision=fp8", "train.fp8_recipe=delayed",
                       "train.fp8_bf16_layers=0"]).validate(1)
    with pytest.raises(ConfigError, match="seq_length x train.micro_batch_size"):
        load_config(None, ["train.precision=fp8", "model.seq_length=100",
                           "train.micro_batch_size=1"]).validate(1)
    with pytest.raises(ConfigError, match="train.fp8_recipe='e5m2'"):
        load_config(None, ["train.fp8_recipe=e5m2"]).validate(1)
    with pytest.raises(ConfigError, match="recompute=full does not work with model.kv_sharing"):
        load_config(None, ["model.recompute=full", "model.kv_sharing=true"]).validate(1)


# ----------------------------------------------------------------------------- FP8 row padding


def _loss_and_grads(model, seed=0):
    model.zero_grad()
    model.train()
    loss = model(input_ids=tokens(seed), labels=tokens(seed + 1)).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("router,layout,multiple", [
    ("expert_choice", "padded", 64),  # 32 x 3 and 16 x 3 rows -> 64 x 3 (past the sequence)
    ("token_choice", "padded", 16), ("token_choice", "packed", 16)])
def test_padding_to_the_fp8_multiple_changes_nothing_but_shapes(router, layout, multiple):
    base = ["model.arch=mor", f"routing.type={router}", f"model.varlen_attention={layout}",
            "routing.z_loss_weight=0.01"]
    plain = make_model(*base)
    padded = make_model(*base, f"model.token_pad_multiple={multiple}")
    rows = []
    for layer in padded.layers.values():
        layer.register_forward_pre_hook(
            lambda mod, a, kw: rows.append(kw["hidden_states"].shape[0] * kw["hidden_states"].shape[1]),
            with_kwargs=True)
    l1, g1 = _loss_and_grads(plain)
    l2, g2 = _loss_and_grads(padded)
    assert abs(l1 - l2) < 1e-6
    assert g1.keys() == g2.keys()
    for n in g1:
        assert (g1[n] - g2[n]).abs().max() < 1e-5, n
    # Every gathered GEMM sees whole multiples (full-length layers see s x b: checked by config).
    assert all(r % multiple == 0 for r in rows if r != SEQ * BATCH), rows
    assert plain.token_counts == padded.token_counts  # padding is never counted
    for k in plain.stats:
        assert torch.allclose(plain.stats[k], padded.stats[k]), k
    assert padded.layers["1"] is not None and any(r != SEQ * BATCH for r in rows)


def test_padded_rows_pattern():
    mask = torch.tensor([[1, 0], [0, 0], [1, 1], [1, 1]], dtype=torch.bool)  # counts 3, 2
    a = ActiveSet(mask, pad_multiple=8)
    assert a.idx.shape == (4, 2) and a.valid.sum() == 5 and a.rows == 8
    p = ActiveSet(mask, pad_multiple=8, packed=True)
    assert p.rows == 8 and p.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 5, 8]
    assert p.idx[:5].tolist() == [0, 2, 3, 2, 3]


# ----------------------------------------------------------------------------- recompute


@pytest.mark.parametrize("mode", ["selective", "full:layer", "full:step"])
def test_recompute_gives_the_same_gradients_and_really_recomputes(mode):
    recompute, _, unit = mode.partition(":")
    extra = [f"model.recompute={recompute}"] + ([f"model.recompute_unit={unit}"] if unit else [])
    base = ["model.arch=mor", "routing.type=token_choice"]
    ref, rc = make_model(*base), make_model(*base, *extra)
    calls = []
    for layer in rc.layers.values():
        layer.register_forward_pre_hook(lambda *a: calls.append(1))
        layer.self_attention.core_attention.register_forward_pre_hook(lambda *a: calls.append(2))
    l1, g1 = _loss_and_grads(ref)
    l2, g2 = _loss_and_grads(rc)
    assert l1 == l2
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n
    layer_calls, attn_calls = calls.count(1), calls.count(2)
    if recompute == "full":
        assert layer_calls == 16 and attn_calls == 16  # every layer ran again in backward
    else:
        assert layer_calls == 8 and attn_calls == 16  # only core attention ran again


# ----------------------------------------------------------------------------- sequence parallelism
# What a GPU run under sequence parallelism asks of its layers and collectives, pinned here; the
# multi-rank equality with one process (and the collectives each call site makes, under the
# collective guard) is tests/test_parallel_equality.py.


def _sp_mask(kind: str, s: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "expert":  # k per sequence, equal counts (odd: 21 of 64 needs a padding row at tp 2)
        score = torch.rand(s, b, generator=g)
        top = score.topk(21, dim=0).indices
        return torch.zeros(s, b, dtype=torch.bool).scatter_(0, top, True)
    return torch.rand(s, b, generator=g) < torch.tensor([0.9, 0.3, 0.55])[:b]  # variable counts


@pytest.mark.parametrize("kind,packed,multiple", [
    ("expert", False, 1), ("expert", False, 16), ("token", False, 1), ("token", False, 16),
    ("token", True, 1), ("token", True, 16)])
def test_sequence_parallel_sets_are_the_whole_set_sharded(monkeypatch, kind, packed, multiple):
    """Each tensor-parallel rank's share of a gathered set is a slice of the set that one process
    gathers (plus padding rows after every sequence's tokens, zero, never scattered): k (or t)
    padded to a multiple of tp, each rank's rows to the FP8 multiple; scattering back writes each
    rank's own positions exactly as one process does. The collectives are emulated: the
    reduce-scatter sums the ranks' contributions (`own_set`), the all-gather returns the set."""
    from megatron.core import tensor_parallel
    from megamor.model.routing import SequenceShards

    tp, s, b, h = 2, 64, 3, 5
    mask = _sp_mask(kind, s, b)
    x, z = torch.randn(s, b, h), torch.randn(s, b, h)
    one = ActiveSet(mask, multiple, packed)
    ranks = [ActiveSet(mask, multiple, packed, SequenceShards(size=tp, rank=r)) for r in range(tp)]
    n = s // tp
    whole = sum(a.own_set(x[r * n:(r + 1) * n]) for r, a in enumerate(ranks))  # reduce-scatter
    a0 = ranks[0]
    assert a0.rows % tp == 0 and a0.shard_rows == a0.rows // tp
    assert a0.shard_rows % multiple == 0, a0.shard_rows  # rows a GEMM sees before its gather
    assert all(torch.equal(a.idx, a0.idx) for a in ranks)  # every rank sees the same set
    # The real tokens' rows equal one process's gather, in the same order; padding rows are zero.
    valid, one_valid = a0.valid.flatten(), one.valid.flatten()
    assert torch.equal(whole.reshape(-1, h)[valid], one.set_rows(one.gather(x)))
    assert whole.reshape(-1, h)[~valid].abs().sum() == 0
    assert torch.equal(a0.positions().flatten()[valid], one.positions().flatten()[one_valid])
    # Scatter back: every rank writes the set's rows of its own positions (the all-gather of
    # the set shards returns the whole set).
    y_whole = sum(a.own_set(z[r * n:(r + 1) * n]) for r, a in enumerate(ranks))
    monkeypatch.setattr(tensor_parallel, "gather_from_sequence_parallel_region",
                        lambda y, **kw: y_whole)
    base = torch.randn(s, b, h)
    out = torch.cat([a.scatter(base[r * n:(r + 1) * n], y_whole.chunk(tp)[r])
                     for r, a in enumerate(ranks)])
    assert torch.equal(out, one.scatter(base, one.gather(z)))
    assert sum(a.own_rows(base[r * n:(r + 1) * n]).shape[0] for r, a in enumerate(ranks)) == one.num_tokens


def test_sequence_parallel_row_multiples():
    """FP8 + SP: a gathered set's rows per rank (k/tp x b) are a multiple of 16 (32 under
    MXFP8), and a full-length sample of any length is padded to tp x that (depth maps); full
    -length training rows per rank are validated at start-up."""
    from types import SimpleNamespace

    from megamor.model.mor_model import fp8_padded, sequence_multiple
    from megamor.model.routing import _sharded_rows

    assert _sharded_rows(21, 3, 16, 2) == 32  # 16 rows x 3 per rank = 48, a multiple of 16
    assert _sharded_rows(21, 4, 16, 2) == 24  # 12 x 4 = 48
    assert _sharded_rows(21, 1, 1, 2) == 22 and _sharded_rows(21, 1, 1, 1) == 21
    cfg = lambda **kw: SimpleNamespace(**{"fp8": "hybrid", "fp8_recipe": "tensorwise",  # noqa: E731
                                          "sequence_parallel": True, "tensor_model_parallel_size": 2, **kw})
    assert sequence_multiple(cfg()) == 32
    assert sequence_multiple(cfg(fp8_recipe="mxfp8")) == 64
    assert sequence_multiple(cfg(fp8=None)) == 2
    assert sequence_multiple(cfg(sequence_parallel=False)) == 16
    assert len(fp8_padded(list(range(40)), cfg())) == 64
    with pytest.raises(ConfigError, match="seq_length / tensor_model_parallel_size x train.micro_batch_size = 24"):
        load_config(None, ["train.precision=fp8", "model.seq_length=48", "train.micro_batch_size=1",
                           "parallel.tensor_model_parallel_size=2",
                           "parallel.sequence_parallel=true"]).validate(2)


def test_sequence_parallel_flags_router_and_norm_weights():
    """Under SP each tensor-parallel rank's router and norm copies see its tokens only: their
    weights carry megatron's `sequence_parallel` flag, whose gradients finalize_model_grads sums
    over tensor parallel (TE's norms flag themselves; the local norm is megamor's TorchRMSNorm,
    since megatron's WrappedTorchNorm refuses SP). Built at TP 1 (the flags come from the
    config; SP over one rank is the identity, so the model computes what it does without SP)."""
    from megamor.model import build_stage, transformer_config
    from megamor.model.routing import WHOLE

    for router in ("expert_choice", "token_choice"):
        cfg = load_config(None, ["model.preset=tiny", f"model.seq_length={SEQ}", "model.arch=mor",
                                 f"routing.type={router}", "model.backend=local"]).validate(1)
        tcfg = transformer_config(cfg, torch.float32)
        tcfg.sequence_parallel = True  # megatron's config refuses it at TP 1; the flags are ours
        model = build_stage(cfg, tcfg, 256, 0, seed=7)
        assert model.shards is WHOLE  # one tensor-parallel rank: nothing to shard
        flagged = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
        norms = {n for n, p in model.named_parameters() if "layernorm" in n or "final_norm" in n}
        routers = {n for n, _ in model.named_parameters() if n.startswith("routers.")}
        assert routers and norms and flagged == routers | norms, sorted(flagged ^ (routers | norms))
        plain = make_model("model.arch=mor", f"routing.type={router}")
        assert not any(getattr(p, "sequence_parallel", False) for p in plain.parameters())
        l1, g1 = _loss_and_grads(plain)
        l2, g2 = _loss_and_grads(model)
        assert l1 == pytest.approx(l2, abs=1e-6)


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_routers_are_called_as_modules(world_of_one, routing):
    """megatron waits for a bucket's parameter all-gather (overlap_param_gather, on by default on
    GPU) in forward pre-hooks: a router used without its module call would read the weights of
    before the last optimizer step. Each router is entered through its module, in training and
    in inference routing."""
    model = make_model("model.arch=mor", f"routing.type={routing}")
    called = []
    for name, router in model.routers.items():
        router.register_forward_pre_hook(lambda *a, n=name: called.append(n))
    for train in (True, False):
        called.clear()
        model.train(train)
        with torch.no_grad():
            model(input_ids=tokens(), labels=tokens(1))
        assert called and set(called) == set(model.routers), (train, called)
