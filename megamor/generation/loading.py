"""What `megamor generate` runs: a megamor checkpoint (any saved layout) or an exported Hugging
Face directory, as a `MoRForCausalLM` (vanilla models too, with a plan of step-0 layers) and a
text codec. Both paths end in the exported model's code, whose single-request `generate()` is
the engine's reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class LoadError(RuntimeError):
    """A path that is not something the engine can run; the message names it."""


class Codec:
    """encode / decode text, and the EOS id, over either tokenizer kind."""

    def __init__(self, encode, decode, eos_token_id: int | None):
        self.encode, self.decode, self.eos_token_id = encode, decode, eos_token_id


def vanilla_config(llama_conf):
    """A LlamaConfig (megamor vanilla export) as the equivalent MoRConfig."""
    from megamor.hf.configuration_mor import MoRConfig

    c = llama_conf
    for name, ok in (("attention_bias", False), ("mlp_bias", False)):
        if getattr(c, name, ok) != ok:
            raise LoadError(f"config.json: {name}={getattr(c, name)} is not supported")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise LoadError(f"config.json: hidden_act={c.hidden_act!r} is not supported (silu only)")
    if not getattr(c, "tie_word_embeddings", True):
        raise LoadError("config.json: tie_word_embeddings=false is not supported (megamor ties "
                        "input and output embeddings)")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LoadError(f"config.json: rope type {rope.get('rope_type')!r} is not supported")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    n = c.num_hidden_layers
    return MoRConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None), num_hidden_layers=n, rms_norm_eps=c.rms_norm_eps,
        rotary_base=theta, max_position_embeddings=c.max_position_embeddings,
        arch="vanilla", layer_unique=list(range(n)), layer_step=[0] * n, layer_slot=[0] * n,
        num_recursions=1, capacities=[1.0], eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)


def mor_model(conf, state: dict):
    from megamor.hf.modeling_mor import MoRForCausalLM

    model = MoRForCausalLM(conf)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise LoadError(f"weights do not match the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.float().eval()


def load_model(path):
    """-> (MoRForCausalLM in fp32, Codec or None)."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{path} does not exist")
    if (p / "config.json").is_file():
        return _load_hf(p)
    return _load_checkpoint(p)


def _load_hf(p: Path):
    conf = json.loads((p / "config.json").read_text())
    kind = conf.get("model_type")
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama = LlamaForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        model = mor_model(vanilla_config(LlamaConfig.from_pretrained(str(p))), llama.state_dict())
    elif kind == "megamor_mor":
        from megamor.hf.modeling_mor import MoRForCausalLM

        model = MoRForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
    else:
        raise LoadError(f"{p / 'config.json'}: model_type {kind!r} is not a megamor export "
                        "(expected megamor_mor or llama)")
    codec = None
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p))
        codec = Codec(lambda text: tok(text)["input_ids"],
                      lambda ids: tok.decode(ids), _eos(p, model, tok))
    return model, codec


def _eos(p: Path, model, tok) -> int | None:
    gen = p / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
    eos = eos if eos is not None else tok.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def _load_checkpoint(p: Path):
    from megamor.checkpoint import CheckpointError
    from megamor.hf.export import _token_ids, hf_config, hf_state_dict
    from megamor.inference import load_for_inference

    try:
        model, cfg, tok = load_for_inference(p)
    except CheckpointError as e:
        raise LoadError(str(e)) from None
    vocab = cfg.model.vocab_size or tok.vocab_size
    conf = hf_config(cfg, model, vocab, tok)
    if getattr(conf, "model_type", "") == "llama":
        conf = vanilla_config(conf)
    conf.max_position_embeddings = cfg.model.seq_length
    hf = mor_model(conf, hf_state_dict(model, cfg, vocab))
    eos = _token_ids(tok)["eos_token_id"]
    return hf, Codec(tok.encode, tok.decode, eos)
