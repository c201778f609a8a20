"""TP x PP x DP training equals one process (fp32, tight tolerance), for every model kind, on
contiguous and interleaved (virtual) pipelines.

Each scenario launches its gloo ranks once and trains several model kinds in that launch; the
single-process reference uses micro-batches of micro_batch_size x dp, which is what all data
parallel ranks see together at each micro-step (the sampler guarantees it), so router statistics
that are global over data-parallel ranks are compared with the same numbers. A kind `K+sp` is K
with sequence parallelism (compared with K's single-process run).
"""

import math
from pathlib import Path

import pytest
import torch

from conftest import run_kinds

pytestmark = pytest.mark.slow  # 4- and 8-rank training against a single-process reference

STEPS = ["train.train_steps=3", "train.global_batch_size=8"]
MAIN_KINDS = ["vanilla", "recursive", "mor_ec", "mor_tc"]
EXTRA_KINDS = ["mor_ec_kvshare", "mor_ec_auxrouter", "mor_tc_free", "recursive_seq"]
# Sequence parallelism, added to existing launches: TP 2 x DP 2, and TP 2 x PP 2 with the cut
# inside a recursion step.
SP_KINDS = ["vanilla+sp", "mor_ec+sp", "mor_ec_kvshare+sp"]
SP_PP_KINDS = ["mor_tc+sp"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, builtin_root):
    tmp = tmp_path_factory.mktemp("ref")
    return run_kinds(tmp, builtin_root, 1, MAIN_KINDS + EXTRA_KINDS,
                     STEPS + ["train.micro_batch_size=4"])


def assert_same_training(ref: dict, got: dict, kinds, rel=2e-5):
    for kind in kinds:
        r, g = ref[kind.partition("+")[0]], got[kind]
        for hr, hg in zip(r["history"], g["history"], strict=True):
            step = hr["step"]
            assert hg["loss"] == pytest.approx(hr["loss"], rel=rel, abs=1e-6), (kind, step, "loss")
            assert hg["grad_norm"] == pytest.approx(hr["grad_norm"], rel=1e-4), (kind, step, "grad norm")
            for key, v in hr.items():
                if key.startswith("router/") and "tokens" in key or key.endswith(("selected", "reached")):
                    assert hg[key] == v, (kind, step, key)
                elif key.startswith("router/"):
                    assert hg[key] == pytest.approx(v, rel=1e-4, abs=1e-6), (kind, step, key)
            # Same tokens through every unrolled layer, whatever the layout.
            assert hg["layer_tokens"] == hr["layer_tokens"], (kind, step)
        # Inference routing (a depth map's forward) decides the same depth for every token.
        assert g["depths"] == r["depths"], (kind, g["depths"], r["depths"])
        assert g["shared"]["mismatched"] == [], (kind, g["shared"])


def test_tp2_pp2_dp2_matches_single_process(reference, tmp_path, builtin_root):
    got = run_kinds(tmp_path, builtin_root, 8, MAIN_KINDS, STEPS + [
        "train.micro_batch_size=2", "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2"])
    assert_same_training(reference, got, MAIN_KINDS)
    for kind in MAIN_KINDS:
        assert got[kind]["shared"]["copies_compared"] > 0  # copies across stages, tp and dp exist
    # The cost-balanced cut (output layer on the last stage: [4, 4]); each stage processed the
    # tokens of its layers that one process counted.
    ec = got["mor_ec"]
    assert ec["ranges"] == [[0, 4], [4, 8]]
    layer_tokens = reference["mor_ec"]["history"][-1]["layer_tokens"]
    assert ec["stage_tokens"] == [sum(layer_tokens[a:b]) for a, b in ec["ranges"]]


def test_tp2_x_pp2_cut_inside_a_recursion_step(reference, tmp_path, builtin_root):
    # pipeline_layers=[2, 6]: the stage boundary falls between the two layers of step 1, so the
    # routing state (active tokens, gates, step input) must cross it inside the wire tensor.
    got = run_kinds(tmp_path, builtin_root, 4, MAIN_KINDS + SP_PP_KINDS, STEPS + [
        "train.micro_batch_size=4", "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layers=[2,6]"])
    assert_same_training(reference, got, MAIN_KINDS + SP_PP_KINDS)
    assert got["mor_ec"]["ranges"] == [[0, 2], [2, 8]]
    # Full-length wire [s, b, 2h + 2] without sequence parallelism, [s/tp, b, 2h + 2] with it
    # (what megatron's p2p expects under SP), token-choice depths and gates included.
    assert got["mor_tc"]["wire"] == [[64, 4, 130]]
    assert got["mor_tc+sp"]["wire"] == [[32, 4, 130]]
    rows = got["mor_tc+sp"]["layer_rows"]
    assert rows[0] == rows[7] == 32 and all(r <= 32 for r in rows)


def test_pp2_vp2_dp2_interleaved_with_overlap_matches_single_process(reference, tmp_path,
                                                                     builtin_root):
    # megatron's interleaved schedule, two chunks per stage: pieces [2, 0, 3, 3] in execution
    # order put layers 0-1 and 2-4 on stage 0 (the shared block's unique layer 1 in both of its
    # chunks: one module, gradients from both chunks' backward passes), an empty chunk on stage 1
    # (passes the wire on) and 5-7 on stage 1; the cut falls inside recursion step 1 and the
    # routing state crosses two hops. DP 2 with the distributed optimizer and overlapped
    # gradient reduction / parameter gathering (a bucket may start only once every chunk's
    # last backward has added into its shared weights).
    got = run_kinds(tmp_path, builtin_root, 4, MAIN_KINDS, STEPS + [
        "train.micro_batch_size=2", "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_size=2", "parallel.pipeline_layers=[2,0,3,3]",
        "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"])
    assert_same_training(reference, got, MAIN_KINDS)
    ec = got["mor_ec"]
    assert ec["pieces"] == [[[0, 2], [2, 5]], [[2, 2], [5, 8]]]
    layer_tokens = reference["mor_ec"]["history"][-1]["layer_tokens"]
    assert ec["stage_tokens"] == [sum(sum(layer_tokens[a:b]) for a, b in mine)
                                  for mine in ec["pieces"]]
    for kind in MAIN_KINDS:
        assert got[kind]["shared"]["copies_compared"] > 0
    # The final checkpoints (saved from the chunks: one sharded state, each layer once) hold the
    # weights one process trained, under the same keys, for every kind (the recursive
    # baseline's copies of shared layers on both stages, and in both chunks of stage 0).
    from megamor.checkpoint import find_latest, read_tensors
    for kind in MAIN_KINDS:
        wa = read_tensors(find_latest(Path(reference[kind]["checkpoints"])))
        wb = read_tensors(find_latest(Path(got[kind]["checkpoints"])))
        weights = [k for k in wa if not k.startswith("optimizer")]
        assert weights and set(weights) == {k for k in wb if not k.startswith("optimizer")}, kind
        for k in weights:
            assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), (kind, k)


def _sites(kind_result: dict) -> set:
    """(function, megamor file[:function]) of every torch.distributed call a kind made on rank 0."""
    out = set()
    for call in kind_result["collectives"]:
        fn, _, where = call.partition(" @ ")
        out |= {(fn, where), (fn, where.split(":")[0])}
    return out


def test_tp2_dp2_kv_sharing_aux_router_loss_free_sequence(reference, tmp_path, builtin_root):
    got = run_kinds(tmp_path, builtin_root, 4, EXTRA_KINDS + SP_KINDS, STEPS + [
        "train.micro_batch_size=2", "parallel.tensor_model_parallel_size=2"], flags=["--guard"])
    assert_same_training(reference, got, EXTRA_KINDS + SP_KINDS)
    # The whole launch ran under the collective guard: no tensor an NCCL group would reject.
    for kind in EXTRA_KINDS + SP_KINDS:
        assert got[kind]["violations"] == [], (kind, got[kind]["violations"])
    # What a GPU run under sequence parallelism asks of its collectives: the layers all-gather
    # and reduce-scatter (no all-reduce), routing all-gathers the scores / masks, reduce-scatters
    # the gathered set into shards and all-gathers it back, sums router losses over the shards,
    # and the norm and router gradients are all-reduced over tensor parallel after backward.
    model = "megamor/model/mor_model.py"
    layers_sp = {("all_gather_into_tensor", model), ("reduce_scatter_tensor", model)}
    routing_sp = {("all_gather_into_tensor", "megamor/model/routing.py:full"),
                  ("reduce_scatter_tensor", "megamor/model/routing.py:gather"),
                  ("all_gather_into_tensor", "megamor/model/routing.py:set_rows"),
                  ("all_reduce", "megamor/model/routing.py:total")}
    grads_sp = {("all_reduce", "megamor/engines/megatron.py:_finalize_grads")}
    ec_sp, van_sp = _sites(got["mor_ec+sp"]), _sites(got["vanilla+sp"])
    tp_only = _sites(got["mor_ec_auxrouter"])  # the same router at TP 2 without SP
    assert layers_sp | routing_sp | grads_sp <= ec_sp, sorted(ec_sp)
    assert layers_sp | grads_sp <= van_sp and not routing_sp & van_sp, sorted(van_sp)
    assert ("all_reduce", model + ":fn") in tp_only and ("all_reduce", model + ":fn") not in ec_sp
    assert not (layers_sp | routing_sp | grads_sp) & tp_only, sorted(tp_only)
    # Sequence parallelism: every layer's input is this rank's share of its token set: s/tp of
    # a full-length sequence, k_r/tp of a gathered set, k_3 = 21 padded to 22 (a multiple of tp).
    assert got["vanilla+sp"]["layer_rows"] == [32] * 8
    assert got["mor_ec+sp"]["layer_rows"] == [32, 32, 32, 21, 21, 11, 11, 32]
    assert got["mor_ec_kvshare+sp"]["layer_rows"] == [32, 32, 32, 21, 21, 11, 11, 32]
    # Loss-free balancing moved its bias identically on every data-parallel replica (checked by
    # equal losses); and it did move: depth loads differ from the first step's.
    h = got["mor_tc_free"]["history"]
    assert any(h[0][k] != h[-1][k] for k in h[0] if k.startswith("router/depth"))


def test_expected_compute_saving(reference):
    """Tokens through the block: expert-choice capacities 1, 2/3, 1/3 of the sequence."""
    seq, batch = 64, 8
    ec = reference["mor_ec"]["history"][0]
    assert ec["frac/step1"] == 1.0
    assert ec["frac/step2"] == pytest.approx(math.floor(2 / 3 * seq) / seq)
    assert ec["frac/step3"] == pytest.approx(math.floor(1 / 3 * seq) / seq)
    # Per unrolled layer: prelude and coda see everything, step r's two layers k_r per sequence.
    assert ec["layer_tokens"] == [seq * batch] * 3 + [42 * batch] * 2 + [21 * batch] * 2 + [seq * batch]
    # Exactly k_r per sequence -> identical work on every data-parallel rank (no stragglers).
    assert ec["router/step2/selected"] == 42 * batch and ec["router/step3/selected"] == 21 * batch
    van = reference["vanilla"]["history"][0]
    assert sum(ec["layer_tokens"]) / sum(van["layer_tokens"]) == pytest.approx((2 + 2 * (64 + 42 + 21) / 64) / 8)
