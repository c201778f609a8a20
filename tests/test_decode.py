"""Cached decoding of the exported MoR model (megamor/hf/modeling_mor.py) at batch 32.

In-process, random weights, routers scaled so that every recursion step keeps a varying part of
the batch (deep routing): the one-token decode path (row selection, in-place cache appends,
attention over the whole batch's cache) must give the logits of a full recomputation, cache
exactly the tokens each layer processed, and not re-allocate the cache at every step.
"""

import pytest
import torch

pytest.importorskip("transformers")
from megamor.hf.configuration_mor import MoRConfig  # noqa: E402
from megamor.hf.modeling_mor import MoRForCausalLM  # noqa: E402

# 1 + 2 x 3 + 1 unrolled layers, middle-cycle sharing
PLAN = dict(num_hidden_layers=8, layer_unique=[0, 1, 2, 1, 2, 1, 2, 3],
            layer_step=[0, 1, 1, 2, 2, 3, 3, 0], layer_slot=[0, 0, 1, 0, 1, 0, 1, 0],
            num_recursions=3, arch="mor")


def _model(router_type: str, kv_sharing: bool) -> MoRForCausalLM:
    torch.manual_seed(0)
    conf = MoRConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=2, router_type=router_type, kv_sharing=kv_sharing,
                     router_alpha=0.5, **PLAN)
    model = MoRForCausalLM(conf).eval()
    with torch.no_grad():  # routers far from sigmoid = 0.5 everywhere: decisions vary by token
        for router in model.model.routers.values():
            router.weight.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("router_type,kv_sharing", [("expert_choice", False),
                                                    ("expert_choice", True),
                                                    ("token_choice", False)])
def test_decode_batch32_equals_recomputation(router_type, kv_sharing):
    model = _model(router_type, kv_sharing)
    conf = model.config
    b, prompt, new = 32, 10, 8
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, conf.vocab_size, (b, prompt + new), generator=g)
    mask = torch.ones(b, prompt + new, dtype=torch.long)
    for row in range(b):  # left padding of 0..6 columns
        mask[row, : row % 7] = 0
    traces = []
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        trace = {}
        out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True,
                    routing_trace=trace)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        traces.append(trace)
        buffers = [set() for _ in range(conf.num_hidden_layers)]
        for i in range(prompt, prompt + new):
            trace = {}
            out = model(ids[:, i:i + 1], attention_mask=mask[:, : i + 1], cache=cache,
                        use_cache=True, routing_trace=trace)
            traces.append(trace)
            diff = (out.logits[:, -1] - full[:, i]).abs().max().item()
            assert diff < 1e-5, (i, diff)
            for layer, k in enumerate(cache.k):
                if k is not None:
                    buffers[layer].add(k.data_ptr())
    # deep routing: the last step takes some but not all of the decoded tokens, varying by row
    last = torch.cat([t[3] for t in traces[1:]], dim=1)
    assert 0 < last.float().mean().item() < 0.9
    assert last.sum(1).unique().numel() > 1
    # the cache holds exactly the tokens each unrolled layer processed
    reached = {s: sum(t[s].sum(1) for t in traces) for s in (1, 2, 3)}
    for layer, step in enumerate(conf.layer_step):
        length = cache.length[layer]
        if step == 0:
            assert length.tolist() == mask.sum(1).tolist()
        elif kv_sharing and step > 1:
            assert length is None and cache.k[layer] is None
        else:
            assert length.tolist() == reached[step].tolist(), layer
    # geometric growth: at most one re-allocation over the decoded steps, per layer
    assert max(len(p) for p in buffers) <= 2, [len(p) for p in buffers]
