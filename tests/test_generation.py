"""The generation engine (megamor/generation): continuous batching of requests, depth-wise
batching of recursion steps, paged KV cache.

In-process, tiny random models of every kind (routers scaled so that each recursion step keeps a
varying part of the tokens). For each request, greedy tokens equal the exported model's
single-request `generate()`, whatever the other requests, their arrival order, the batch limit,
the prompt chunking, the schedule and a KV budget that forces preemption. fp32 batched and
single-row matmuls may differ in the last bits: the references' top-1 / top-2 logit gaps and the
engine's routing margins are checked to be far above that, so an equal token is not luck.
"""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")
from megamor.generation import Engine, Request, RequestError, parse_jsonl  # noqa: E402
from megamor.hf.configuration_mor import MoRConfig  # noqa: E402
from megamor.hf.modeling_mor import MoRForCausalLM  # noqa: E402

VOCAB = 300
# 1 + 2 x 3 + 1 unrolled layers, middle-cycle sharing
MOR = dict(num_hidden_layers=8, layer_unique=[0, 1, 2, 1, 2, 1, 2, 3],
           layer_step=[0, 1, 1, 2, 2, 3, 3, 0], layer_slot=[0, 0, 1, 0, 1, 0, 1, 0], num_recursions=3)
# 2 x 3 unrolled layers, sequence sharing (step 2 runs unique layers 0 and 1)
SEQUENCE = dict(num_hidden_layers=6, layer_unique=[0, 0, 0, 1, 1, 1], layer_step=[1, 1, 2, 2, 3, 3],
                layer_slot=[0, 1, 0, 1, 0, 1], num_recursions=3, sharing="sequence")
VANILLA = dict(num_hidden_layers=6, layer_unique=list(range(6)), layer_step=[0] * 6,
               layer_slot=[0] * 6, num_recursions=1, capacities=[1.0])
KINDS = {
    "expert": dict(arch="mor", **MOR),
    "expert_kvshare": dict(arch="mor", kv_sharing=True, **MOR),
    "expert_auxrouter": dict(arch="mor", causal_routing="aux_router", **MOR),
    "token": dict(arch="mor", router_type="token_choice", **MOR),
    "token_lossfree_kvshare": dict(arch="mor", router_type="token_choice", balancing="loss_free",
                                   kv_sharing=True, **MOR),
    "expert_sequence": dict(arch="mor", **SEQUENCE),
    "recursive": dict(arch="recursive", **MOR),
    "recursive_kvshare": dict(arch="recursive", kv_sharing=True, **MOR),
    "vanilla": dict(arch="vanilla", **VANILLA),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: with the cores shared, spinning OpenMP workers slow tiny matmuls
    down a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(kind: str) -> MoRForCausalLM:
    torch.manual_seed(0)
    conf = MoRConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=2, router_alpha=0.5, max_position_embeddings=96,
                     **KINDS[kind])
    model = MoRForCausalLM(conf).eval()
    with torch.no_grad():  # routers far from the threshold: decisions vary by token
        for router in model.model.routers.values():
            router.weight.normal_(0.0, 0.5)
            if getattr(router, "aux", None) is not None:
                router.aux[2].weight.normal_(0.0, 0.5)
            if hasattr(router, "bias"):
                router.bias.copy_(torch.tensor([0.0, 0.02, -0.02]))
    return model


def _requests(n: int, seed: int = 0) -> list[Request]:
    g = random.Random(seed)
    return [Request(prompt_ids=[g.randrange(VOCAB) for _ in range(g.randrange(1, 30))],
                    max_new_tokens=g.randrange(1, 16), stop_token_ids=[]) for _ in range(n)]


def _reference(model, req: Request):
    """The exported model's single-request greedy generation; also the smallest top-1 / top-2
    logit gap along it."""
    n = req.max_new_tokens
    out = model.generate(torch.tensor([req.prompt_ids]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    gaps = [float(l[0].topk(2).values.diff().abs()) for l in out.logits]
    return out.sequences[0, len(req.prompt_ids):].tolist(), min(gaps)


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(kind):
        if kind not in cache:
            model = _model(kind)
            reqs = _requests(10)
            refs = [_reference(model, r) for r in reqs]
            assert min(g for _, g in refs) > 1e-4  # far above fp32 reduction-order noise (~1e-6)
            cache[kind] = model, reqs, [t for t, _ in refs]
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", list(KINDS))
def test_tokens_equal_single_request_generation(references, kind):
    model, reqs, ref = references(kind)
    settings = [  # (schedule, max_batch, prefill chunk, KV page size)
        ("depthwise", 16, 512, 16), ("depthwise", 3, 5, 4), ("synchronous", 4, 512, 8)]
    for i, (schedule, batch, chunk, page) in enumerate(settings):
        order = list(range(len(reqs)))
        random.Random(i).shuffle(order)  # another arrival order for each setting
        engine = Engine(model, max_batch=batch, schedule=schedule, prefill_chunk=chunk,
                        block_size=page)
        engine.runner.record_margins = True
        got = engine.generate([reqs[j] for j in order])
        for res, j in zip(got, order):
            assert res.tokens == ref[j], (kind, schedule, batch, j)
            assert res.finish_reason == "length"
        assert engine.runner.min_margin > 1e-5, engine.runner.min_margin  # routing decisions
        assert engine.cache.pages_used == 0  # every finished sequence returned its pages
        st = engine.stats.summary()
        if schedule == "depthwise" and batch == 16 and model.config.arch == "mor":
            # tokens of several depths shared block calls, and some tokens skipped steps
            assert st["block_rows_per_call"] > 2
            assert st["layer_passes_per_decoded_token"] < model.config.num_hidden_layers


def test_kv_budget_preempts_and_recomputes_exactly(references, monkeypatch):
    model, reqs, ref = references("expert")
    page = 2 * 2 * 16 * 4 * 4  # K and V x 2 KV heads x head dim 16 x fp32 x 4 entries
    engine = Engine(model, max_batch=8, block_size=4, kv_cache_bytes=150 * page)
    got = engine.generate(reqs)  # admission by expected pages: sequences wait for room
    assert [r.tokens for r in got] == ref
    assert engine.stats.summary()["mean_in_flight"] < 8
    # admitting regardless of what running sequences will need makes the cache overflow:
    # the newest sequences are preempted and recomputed, with the same tokens
    monkeypatch.setattr(Engine, "_expected_pages", lambda self, s: 0.0)
    greedy = Engine(model, max_batch=8, block_size=4, kv_cache_bytes=150 * page)
    got = greedy.generate(reqs)
    assert greedy.stats.preemptions > 0
    assert [r.tokens for r in got] == ref
    too_small = Engine(model, max_batch=2, block_size=4, kv_cache_bytes=3 * page)
    with pytest.raises(RequestError, match="request 0: needs .* KV pages"):
        too_small.generate(reqs[:1])


def test_paged_cache_holds_what_each_step_processed():
    """Mid-stream, each (sequence, cache layer) list owns ceil(length / page) pages, and the
    lists of deeper recursion steps hold fewer entries (recursion-wise caching); with KV
    sharing, steps > 1 own no list at all."""
    for kind in ("expert", "expert_kvshare"):
        model = _model(kind)
        engine = Engine(model, max_batch=6, block_size=4)
        reqs = _requests(12, seed=3)
        stream = engine.stream(reqs)
        next(stream)
        cache, runner = engine.cache, engine.runner
        bs = cache.block_size
        used = 0
        for slot in range(6):
            for col in range(cache.num_layers):
                n = int(cache.length[slot, col])
                assert (cache.table[slot, col] != 0).sum() == -(-n // bs)
                used += -(-n // bs)
        assert used == cache.pages_used
        steps = [model.config.layer_step[i] for i in runner.cache_layers]
        if kind == "expert_kvshare":
            assert max(steps) == 1
        else:
            per_step = {s: cache.length[:, [c for c, t in enumerate(steps) if t == s]].sum()
                        for s in (1, 2, 3)}
            assert per_step[1] > per_step[2] > per_step[3] > 0, per_step
        list(stream)
        assert cache.pages_used == 0


def test_sampling_depends_only_on_the_request_seed(references):
    model, reqs, ref = references("token")
    sampled = [Request(prompt_ids=r.prompt_ids, max_new_tokens=12, stop_token_ids=[],
                       temperature=1.5, top_k=50, top_p=0.95, seed=i) for i, r in enumerate(reqs)]
    a = Engine(model, max_batch=10).generate(sampled)
    b = Engine(model, max_batch=2, schedule="synchronous").generate(sampled[::-1])[::-1]
    assert [r.tokens for r in a] == [r.tokens for r in b]
    greedy = Engine(model, max_batch=10).generate(
        [Request(prompt_ids=r.prompt_ids, max_new_tokens=12, stop_token_ids=[]) for r in reqs])
    assert sum(x.tokens != y.tokens for x, y in zip(a, greedy)) >= len(reqs) // 2


def test_stop_token_ends_the_request(references):
    model, reqs, ref = references("expert")
    j = next(i for i, t in enumerate(ref) if len(t) >= 4)
    stop = ref[j][2]
    first = ref[j].index(stop)
    req = Request(prompt_ids=reqs[j].prompt_ids, max_new_tokens=50, stop_token_ids=[stop])
    (res,) = Engine(model).generate([req])
    assert res.tokens == ref[j][: first + 1] and res.finish_reason == "stop"
    long = Request(prompt_ids=[5] * 90, max_new_tokens=50, stop_token_ids=[])
    (res,) = Engine(model).generate([long])  # context 96: positions 90..95 fed, one more sampled
    assert res.finish_reason == "context" and len(res.tokens) == 7


def test_bad_requests_are_named():
    with pytest.raises(RequestError, match=r"p.jsonl:2: not valid JSON"):
        parse_jsonl(['{"prompt": "a"}', '{"prompt": '], "p.jsonl")
    with pytest.raises(RequestError, match=r"p.jsonl:1: unknown field 'temprature'"):
        parse_jsonl(['{"prompt": "a", "temprature": 1}'], "p.jsonl")
    with pytest.raises(RequestError, match=r"p.jsonl:3: field 'top_p' must be .* got 2"):
        parse_jsonl(['{"prompt": "a"}', "", '{"prompt": "a", "top_p": 2}'], "p.jsonl")
    with pytest.raises(RequestError, match=r"p.jsonl:1: expected a JSON object"):
        parse_jsonl(['["a"]'], "p.jsonl")
    engine = Engine(_model("vanilla"))
    with pytest.raises(RequestError, match=r"request 1: field 'prompt_ids' has 97 tokens, more "
                                           r"than the model's context of 96"):
        engine.generate([Request(prompt_ids=[1]), Request(prompt_ids=[1] * 97)])
    with pytest.raises(RequestError, match=r"request 0: field 'prompt' needs a tokenizer"):
        engine.generate(["text"])
    with pytest.raises(RequestError, match=r"token id 300 is outside the vocabulary of 300"):
        engine.generate([Request(prompt_ids=[300])])


def test_cli_on_an_exported_directory(tmp_path, capsys):
    """`megamor generate DIR --prompts FILE`: text in, JSON lines out in input order, tokens equal
    the exported model's generate(); bad input names the line and writes nothing."""
    from megamor.hf.export import save_tokenizer
    from megamor.tokenizer import train_bpe

    tok = train_bpe(["the module reads the file and splits each line into fields"] * 20,
                    VOCAB, tmp_path / "tok")
    model = _model("expert")
    model.config.eos_token_id = tok.hf.token_to_id(tok.eos_token)
    export = tmp_path / "hf"
    model.save_pretrained(str(export))
    save_tokenizer(tok, export)
    prompts = ["the module reads", "each line", "fields of the file and the module"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p, "id": i, "max_new_tokens": 6 + i})
                             for i, p in enumerate(prompts)) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(export), "--prompts", str(src), "--max-new-tokens", "8",
            "--max-batch", "2", "--out", str(out)]
    from megamor.cli import main
    assert main(args) == 0  # in-process: the same entry point as the `megamor` script
    assert "tok/s" in capsys.readouterr().err
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["id"] for l in lines] == [0, 1, 2]
    for i, line in enumerate(lines):
        ids = tok.encode(prompts[i])
        ref = model.generate(torch.tensor([ids]), max_new_tokens=6 + i, do_sample=False)
        assert line["tokens"] == ref[0, len(ids):].tolist()
        assert line["prompt"] == prompts[i] and line["prompt_tokens"] == len(ids)
        assert isinstance(line["completion"], str)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "max_tokens": 3}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: unknown field 'max_tokens'"):
        main(args[:2] + ["--prompts", str(bad), "--out", str(tmp_path / "o2.jsonl")])
    assert not (tmp_path / "o2.jsonl").exists()
