"""Single-process checks of the model's routing semantics (no launcher needed)."""

import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

from megamor.layout import balanced_cut, build_plan, copy_index, stage_pieces, unique_layers_of
from megamor.model.wire import fold_wire, folded_rows, unfold_wire
from megamor.model.routing import ActiveSet, ExpertChoiceRouter
from single_process import BATCH, SEQ, make_model, tokens, world_of_one  # noqa: F401 (fixture)

# ----------------------------------------------------------------------------- the plan


def test_sharing_strategies_map_layers_as_specified():
    def uniq(sharing, L):
        return [l.unique for l in build_plan("recursive", L, 3, sharing).layers]
    assert uniq("cycle", 6) == [0, 1, 0, 1, 0, 1]
    assert uniq("sequence", 6) == [0, 0, 0, 1, 1, 1]
    assert uniq("middle_cycle", 8) == [0, 1, 2, 1, 2, 1, 2, 3]
    assert uniq("middle_sequence", 8) == [0, 1, 1, 1, 2, 2, 2, 3]
    plan = build_plan("mor", 8, 3, "middle_cycle", [1.0, 2 / 3, 1 / 3])
    assert [l.step for l in plan.layers] == [0, 1, 1, 2, 2, 3, 3, 0]
    assert plan.num_unique == 4 and plan.block_size == 2
    # The paper's 135M MoR: 1 + 10 x 3 + 1 = 32 unrolled layers over 12 unique ones.
    assert build_plan("mor", 32, 3, "middle_cycle").num_unique == 12
    assert [l.unique for l in build_plan("vanilla", 4, 1, "cycle").layers] == [0, 1, 2, 3]


def test_balanced_cut_minimises_the_slowest_stage():
    assert balanced_cut([1, 1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1], 2) == [3, 5]
    assert balanced_cut([1] * 8, 4) == [2, 2, 2, 2]
    assert balanced_cut([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert sum(balanced_cut([0.3] * 7, 3)) == 7


def test_interleaved_pieces_and_the_copies_a_stage_holds():
    plan = build_plan("mor", 8, 3, "middle_cycle", [1.0, 2 / 3, 1 / 3])  # units 0 1 2 1 2 1 2 3
    pieces = stage_pieces(plan, 2, 2, [2, 0, 3, 3])
    # piece j on stage j mod 2 as its chunk j // 2; an empty middle piece passes its input on
    assert pieces == [[(0, 2), (2, 5)], [(2, 2), (5, 8)]]
    assert unique_layers_of(plan, pieces[0]) == [0, 1, 2]  # unit 1 in both chunks, held once
    assert copy_index(plan, pieces, 0) == {0: 0, 1: 0, 2: 0}
    assert copy_index(plan, pieces, 1) == {1: 1, 2: 1, 3: 0}
    assert stage_pieces(plan, 2, 1, [3, 5]) == [[(0, 3)], [(3, 8)]]
    with pytest.raises(ValueError, match="4 piece sizes summing to 7"):
        stage_pieces(plan, 2, 2, [2, 0, 2, 3])


def test_the_wire_folds_into_megatrons_send_shape_and_back():
    for seq, hidden, batch in ((64, 64, 4), (32, 64, 2), (21, 8, 3), (1, 4, 1)):
        wire = torch.randn(seq, batch, 2 * hidden + 2, requires_grad=True)
        folded = fold_wire(wire, hidden)
        assert folded.shape == (folded_rows(seq, 2 * hidden + 2, hidden), batch, hidden)
        assert torch.equal(unfold_wire(folded, 2 * hidden + 2), wire)
        (unfold_wire(folded, 2 * hidden + 2) * 3).sum().backward()  # gradients pass unchanged
        assert torch.equal(wire.grad, torch.full_like(wire, 3.0))
    assert folded_rows(64, 130, 64) == 130  # the tiny MoR's wire at seq 64: 2 x 64 + 2 rows


# ----------------------------------------------------------------------------- routing


def test_active_set_gathers_in_causal_order_and_scatters_back():
    mask = torch.tensor([[1, 0], [0, 0], [1, 1], [1, 1]], dtype=torch.bool)  # [s=4, b=2]
    a = ActiveSet.from_mask(mask)
    assert a.idx.t().tolist() == [[0, 2, 3], [2, 3, 0]]
    assert a.valid.t().tolist() == [[True, True, True], [True, True, False]]
    x = torch.arange(8.0).view(4, 2, 1)
    y = a.gather(x)
    assert y[:, 0, 0].tolist() == [0.0, 4.0, 6.0]
    out = a.scatter(torch.zeros_like(x), y + 100)
    assert out[:, 1, 0].tolist() == [0.0, 0.0, 105.0, 107.0]  # padding row did not land at 0
    m = a.attention_mask()[:, 0]
    assert m[1].tolist() == [[False, True, True], [False, False, True], [False, False, True]]


def test_expert_choice_picks_k_per_sequence_among_survivors():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(16, 0.1, 0.5, aux_router=False)
    x = torch.randn(20, 4, 16)
    reached = torch.rand(20, 4) < 0.7
    reached[:12] = True
    sel, gate, aux, _ = router.route(x, reached, 1 / 3, threshold=False)
    assert (sel.sum(0) == 6).all()  # k = floor(20 / 3)
    assert not (sel & ~reached).any()
    # The chosen are the highest logits among the reached tokens.
    logit = router.logits(x).masked_fill(~reached, float("-inf"))
    for b in range(4):
        assert set(sel[:, b].nonzero().flatten().tolist()) == set(logit[:, b].topk(6).indices.tolist())
    assert torch.allclose(gate, 0.1 * torch.sigmoid(router.logits(x)))
    assert aux.item() > 0


def _record_steps(model):
    seen = []
    orig = model._begin_step

    def begin(state, step):
        before = state.active.clone()
        orig(state, step)
        seen.append((step, before, state.active.clone(), state.tokens.idx.clone()))
    model._begin_step = begin
    return seen


def test_hierarchical_filtering_in_the_model():
    model = make_model("model.arch=mor")
    model.train()
    seen = _record_steps(model)
    model(input_ids=tokens(), labels=tokens(1))
    assert [s[0] for s in seen] == [1, 2, 3]
    for step, before, after, idx in seen:
        k = max(1, int(model.capacities[step - 1] * SEQ))
        assert (after.sum(0) == k).all(), step
        assert not ((after > 0.5) & (before < 0.5)).any(), step  # only previous survivors
        assert (idx[1:] > idx[:-1]).all(), step  # gathered in causal order


def test_threshold_routing_at_inference_uses_no_future_token():
    for extra in ([], ["routing.causal=aux_router"]):
        model = make_model("model.arch=mor", *extra)
        a, b = tokens(0), tokens(0).clone()
        b[:, SEQ // 2:] = tokens(5)[:, SEQ // 2:]  # same prefix, different future
        model.eval()
        with torch.no_grad():
            la, lb = model(input_ids=a), model(input_ids=b)
        cut = SEQ // 2
        # Equal up to summation order (padding to the batch's longest active set changes shapes).
        assert (la[:cut] - lb[:cut]).abs().max() < 1e-5, extra
        # Training-time top-k does look ahead: the same comparison differs (the test can fail).
        model.train()
        with torch.no_grad():
            ta, tb = model(input_ids=a), model(input_ids=b)
        assert (ta[:cut] - tb[:cut]).abs().max() > 1e-3, extra


def test_token_choice_processes_each_token_up_to_its_depth():
    model = make_model("model.arch=mor", "routing.type=token_choice")
    model.train()
    seen = _record_steps(model)
    model(input_ids=tokens(), labels=tokens(1))
    depth = seen[0][2]
    for step, _, _, idx in seen:
        tok = model._active_set(depth, step)
        assert tok.num_tokens == int((depth >= step).sum())
    counts = model.token_counts
    plan = model.plan
    for l in plan.layers:
        if l.step:
            assert counts[l.index] == int((depth >= l.step).sum())


def test_recursive_kv_sharing_reuses_step_one_keys_and_values():
    model = make_model("model.arch=mor", "model.kv_sharing=true")
    calls = []
    for u, layer in model.layers.items():
        layer.self_attention.core_attention.register_forward_pre_hook(
            lambda mod, args, kwargs=None, u=u: calls.append((u, args[0].shape[0], args[1].shape[0], args[2])),
        )
    model.train()
    model(input_ids=tokens(), labels=tokens(1))
    # prelude, step1 x2, step2 x2, step3 x2, coda
    q_lens = [c[1] for c in calls]
    k_lens = [c[2] for c in calls]
    assert q_lens == [SEQ, SEQ, SEQ, 32, 32, 16, 16, SEQ]
    assert k_lens == [SEQ] * 8  # later steps attend over every token's step-1 K/V
    # Values (no RoPE on V) at steps 2 and 3 are exactly step 1's, slot by slot.
    v = [c[3] for c in calls]
    assert torch.equal(v[3], v[1]) and torch.equal(v[5], v[1])
    assert torch.equal(v[4], v[2]) and torch.equal(v[6], v[2])
    # ... and they receive gradient from the later steps' queries.
    model.zero_grad()
    loss = model(input_ids=tokens(), labels=tokens(1)).mean()
    loss.backward()
    assert model.layers["1"].self_attention.linear_qkv.weight.grad.abs().sum() > 0


def _layer_input_lengths(model):
    """Sequence length of the tensor each layer call actually receives."""
    seen = []
    for layer in model.layers.values():
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    return seen


def test_mor_gathering_really_shrinks_compute():
    model = make_model("model.arch=mor")
    lengths = _layer_input_lengths(model)
    model.train()
    model(input_ids=tokens(), labels=tokens(1))
    k2, k3 = int(2 / 3 * SEQ), int(1 / 3 * SEQ)
    # The layers of steps 2 and 3 run on [k, b, h] tensors, not on masked full-length ones.
    assert lengths == [SEQ] * 3 + [k2] * 2 + [k3] * 2 + [SEQ]
    assert [model.token_counts[i] for i in range(8)] == [n * BATCH for n in lengths]


# ----------------------------------------------------------------------------- a masked reference
# The same model computed without any gathering: every step runs on the full sequence with
# attention restricted (by mask) to the step's active tokens, and the updates of MOR_SPEC.md
# written out directly. The gathered implementation must agree with it.


def _masked_layers(model, layers, x, active):
    s, b = active.shape
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    allowed = causal.unsqueeze(0) & active.t().unsqueeze(1)  # [b, q, k]: earlier active keys
    allowed |= torch.eye(s, dtype=torch.bool).unsqueeze(0)  # inactive queries: self only
    mask = (~allowed).unsqueeze(1)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    rope = RotaryEmbedding(model.mcfg.head_dim, 1.0, rotary_base=model.mcfg.rotary_base,
                           use_cpu_initialization=True)(s)  # megatron's own RoPE path
    for l in layers:
        x = model.layers[str(l.unique)](hidden_states=x, attention_mask=mask, rotary_pos_emb=rope)[0]
    return x


def _reference_logits(model, ids):
    x = model.embedding(input_ids=ids, position_ids=None)
    s, b = x.shape[:2]
    plan, rc = model.plan.layers, model.rcfg
    everyone = torch.ones(s, b, dtype=torch.bool)
    active = everyone
    depth = gate = None
    for step in [0, 1, 2, 3]:
        layers = [l for l in plan if l.step == step]
        if step == 0:
            x = _masked_layers(model, plan[:1], x, everyone)
            continue
        if rc.type == "expert_choice":
            router = model.routers[str(step)]
            logit = router.logits(x)
            k = max(1, int(model.capacities[step - 1] * s))
            top = logit.masked_fill(~active, float("-inf")).topk(k, dim=0).indices
            sel = torch.zeros_like(active).scatter_(0, top, True)
            y = _masked_layers(model, layers, x, sel)
            g = (rc.resolved_alpha() * torch.sigmoid(logit)).unsqueeze(-1)
            x = torch.where(sel.unsqueeze(-1), x + g * y, x)  # H^{r+1} = H^r + g f(H^r)
            active = sel
        else:
            if step == 1:
                probs = torch.softmax(x @ model.routers["1"].weight.t(), dim=-1)
                depth = probs.argmax(-1) + 1
                gate = (rc.resolved_alpha() * probs.max(-1).values).unsqueeze(-1)
                h1 = x
            proc = depth >= step
            y = _masked_layers(model, layers, x, proc)
            exiting = (depth == step).unsqueeze(-1)
            x = torch.where(exiting, h1 + gate * y, torch.where(proc.unsqueeze(-1), y, x))
    x = _masked_layers(model, plan[-1:], x, everyone)
    logits, _ = model.output_layer(model.final_norm(x), weight=model.shared_embedding_or_output_weight())
    return logits


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_gathered_steps_equal_a_masked_full_length_reference(router):
    model = make_model("model.arch=mor", f"routing.type={router}", "routing.alpha=0.5")
    model.train()  # top-k routing for expert-choice
    ids = tokens(3)
    with torch.no_grad():
        got = model(input_ids=ids)
        want = _reference_logits(model, ids)
    assert (got - want).abs().max() < 1e-4
    assert got.abs().max() > 1e-2  # a real comparison, not of zeros


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_position_counts_add_up_each_steps_selection(router):
    """The dead-token ratio's input: per step, how often each position was selected, summed over
    the sequences of every forward since the last reset."""
    model = make_model("model.arch=mor", f"routing.type={router}")
    model.train()
    model.trace_routing = True
    expected = torch.zeros(3, SEQ)
    for seed in (0, 2):
        model(input_ids=tokens(seed), labels=tokens(seed + 1))
        tr = model.routing_trace
        for r in (1, 2, 3):  # expert-choice: step r's mask; token-choice: depth >= r runs step r
            sel = tr[r] > 0.5 if router == "expert_choice" else tr[1] >= r - 0.5
            expected[r - 1] += sel.sum(1)
    got = torch.stack([model.position_counts[r] for r in (1, 2, 3)])
    assert torch.equal(got, expected)
    assert (got.sum(1) > 0).all() and (got <= 2 * BATCH).all()


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_bf16_stage_keeps_router_parameters_buffers_and_scores_fp32(router):
    """megatron's Float16Module casts every floating tensor of the stage to bf16; megamor's
    wrapper gives the routers back their fp32 tensors (the same parameters, untouched values).
    bf16 would lose the loss-free bias's updates once |bias| >= 0.5 (spacing 2^-8 > rate 1e-3)
    and count token loads exactly only up to 256."""
    from megatron.core.transformer.module import Float16Module

    from megamor.precision import wrap_for_precision

    model = make_model("model.arch=mor", f"routing.type={router}", "routing.balancing=loss_free",
                       "routing.causal=aux_router", dtype=torch.bfloat16)
    fp32_before = {n: p.detach().clone() for n, p in model.routers.named_parameters()}
    wrapped = wrap_for_precision(model.config, model)
    assert isinstance(wrapped, Float16Module)
    assert model.layers["1"].mlp.linear_fc1.weight.dtype == torch.bfloat16
    for n, p in model.routers.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, fp32_before[n]), n
    assert all(b.dtype == torch.float32 for b in model.routers.buffers())
    x = torch.randn(SEQ, BATCH, model.config.hidden_size).bfloat16()
    r = model.routers["1"]
    if router == "token_choice":
        _, gate, probs, logits, counts = r.route(x, True)
        assert {gate.dtype, probs.dtype, logits.dtype, counts.dtype} == {torch.float32}
        r.bias.fill_(0.5)
        r.load.copy_(torch.tensor([257.0, 0.0, 0.0]))
        r.load += torch.tensor([1.0, 2.0, 3.0])
        assert r.load.tolist() == [258.0, 2.0, 3.0]
        r.update_bias(1e-3)
        assert r.bias.tolist() == pytest.approx([0.499, 0.501, 0.501], abs=1e-7)
    else:
        _, gate, aux, stats = r.route(x, torch.ones(SEQ, BATCH, dtype=torch.bool), 2 / 3, False)
        assert gate.dtype == aux.dtype == torch.float32
        assert {v.dtype for v in stats.values()} == {torch.float32}
    # The wrapped stage computes: bf16 activations, fp32 routing, fp32 loss out of the wrapper.
    wrapped.train()
    loss = wrapped(input_ids=tokens(), labels=tokens(1))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert r.weight.grad is not None and r.weight.grad.dtype == torch.float32
