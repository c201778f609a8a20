"""`megamor convert to-hf`: a megamor checkpoint (any TP/PP/DP layout) as a Hugging Face model.

One process, no distributed setup beyond a world of one: the checkpoint is loaded into the
single-process megatron model (`megamor.inference.load_for_inference`, which reshards any
layout), its tensors are renamed / split into Llama's layout (`megamor.hf.weights`), and the
directory is written with transformers' own `save_pretrained` (safetensors), plus the tokenizer
(`tokenizer.json` for PreTrainedTokenizerFast), a generation config and `megamor_export.json`.

- vanilla   -> a plain `LlamaForCausalLM` (no remote code)
- recursive, mor -> `MoRForCausalLM`: modeling_mor.py / configuration_mor.py are copied into the
  directory and named in config.json's auto_map (load with trust_remote_code=True).

The vocabulary is cut back to the real one (megamor pads it to a multiple of
model.make_vocab_size_divisible_by for tensor parallelism); the padding rows are never targets.
The output appears atomically: written to `<out>.tmp-<pid>`, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REMOTE_CODE = ("configuration_mor.py", "modeling_mor.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(RuntimeError):
    """An export that cannot be written; the message names the path or field."""


def quiet_unless_terminal() -> None:
    """No progress bars or accelerator notices when the output is not a terminal (a log file, a
    pipe): transformers' bars off, and DeepSpeed (which transformers imports when installed)
    told the accelerator instead of detecting it, which prints a warning on CPU machines."""
    import sys
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not sys.stderr.isatty():
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def _require_transformers():
    try:
        import transformers  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as e:
        raise ExportError(f"Hugging Face export needs transformers and safetensors "
                          f"(pip install 'megamor[hf]'): {e}") from None


def hf_state_dict(model, cfg, vocab: int) -> dict[str, torch.Tensor]:
    """The single-process megatron model's tensors under Hugging Face names."""
    from tqdm import tqdm

    from megamor.hf.weights import layer_to_hf

    m = cfg.model
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": sd["final_norm.weight"]}
    unique = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
    for u in tqdm(unique, desc="convert layers", unit="layer", leave=False,
                  disable=None):  # no bar unless stderr is a terminal
        for name, t in layer_to_hf(sd, f"layers.{u}.", m.num_attention_heads, m.num_query_groups,
                                   m.head_dim).items():
            out[f"model.layers.{u}.{name}"] = t
    for k, t in sd.items():
        if k.startswith("routers."):
            out[f"model.{k}"] = t
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _token_ids(tok) -> dict:
    eos = tok.hf.token_to_id(tok.eos_token)
    pad = tok.hf.token_to_id(tok.pad_token) if tok.pad_token else eos
    return {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": None}


def hf_config(cfg, model, vocab: int, tok):
    """transformers config object for the checkpoint's architecture."""
    m, r = cfg.model, cfg.routing
    common = dict(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                  num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                  head_dim=m.head_dim, num_hidden_layers=m.num_layers, rms_norm_eps=m.norm_eps,
                  max_position_embeddings=m.seq_length, initializer_range=m.init_std,
                  tie_word_embeddings=True, **_token_ids(tok))
    if m.arch == "vanilla":
        from transformers import LlamaConfig
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False, hidden_act="silu",
                           rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base})
    from megamor.hf.configuration_mor import MoRConfig
    plan = model.plan
    conf = MoRConfig(
        **common, rotary_base=m.rotary_base, num_unique_layers=plan.num_unique,
        layer_unique=[l.unique for l in plan.layers], layer_step=[l.step for l in plan.layers],
        layer_slot=[l.slot for l in plan.layers], arch=m.arch, num_recursions=m.num_recursions,
        sharing=m.sharing, router_type=r.type, router_alpha=r.resolved_alpha(),
        capacities=r.capacities(m.num_recursions), causal_routing=r.causal, balancing=r.balancing,
        kv_sharing=m.kv_sharing, gate_every_step=r.gate_every_step)
    conf.auto_map = {"AutoConfig": "configuration_mor.MoRConfig",
                     "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM"}
    conf.architectures = ["MoRForCausalLM"]
    return conf


def build_hf_model(conf, state: dict[str, torch.Tensor], dtype: torch.dtype):
    if getattr(conf, "model_type", "") == "llama":
        from transformers import LlamaForCausalLM as cls
    else:
        from megamor.hf.modeling_mor import MoRForCausalLM as cls
    model = cls(conf)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ExportError(f"tensor names do not match the {cls.__name__} layout: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model = model.to(dtype).eval()
    for name in getattr(model, "_keep_in_fp32_modules_strict", None) or ():
        for module_name, module in model.named_modules():  # MoR routers stay fp32 (as trained)
            if module_name.split(".")[-1] == name:
                module.float()
    return model


def save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=tok.eos_token,
                                   pad_token=tok.pad_token or tok.eos_token)
    fast.model_max_length = 10**30
    fast.save_pretrained(str(out))


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "float32",
                      overwrite: bool = False) -> Path:
    """Write the Hugging Face directory `out` for `checkpoint`; returns `out`."""
    from megamor.inference import load_for_inference

    quiet_unless_terminal()
    _require_transformers()
    from transformers import GenerationConfig

    out = Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    from megamor.checkpoint import read_meta, resolve_resume

    ckpt = resolve_resume(str(checkpoint), Path(checkpoint))
    model, cfg, tok = load_for_inference(ckpt)
    vocab = cfg.model.vocab_size or tok.vocab_size
    conf = hf_config(cfg, model, vocab, tok)
    hf_model = build_hf_model(conf, hf_state_dict(model, cfg, vocab), DTYPES[dtype])

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        hf_model.save_pretrained(str(tmp), safe_serialization=True)
        if cfg.model.arch != "vanilla":
            for name in REMOTE_CODE:
                shutil.copyfile(HERE / name, tmp / name)
        ids = _token_ids(tok)
        GenerationConfig(eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
                         do_sample=False).save_pretrained(str(tmp))
        save_tokenizer(tok, tmp)
        meta = read_meta(ckpt)
        (tmp / "megamor_export.json").write_text(json.dumps({
            "checkpoint": str(Path(ckpt).resolve()), "step": meta.get("step"),
            "arch": cfg.model.arch, "routing": cfg.routing.type if cfg.model.arch == "mor" else None,
            "kv_sharing": cfg.model.kv_sharing, "tokenizer_fingerprint": tok.fingerprint,
            "dtype": dtype}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
