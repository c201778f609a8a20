"""`megamor convert from-hf`: a Llama-family Hugging Face model as a megamor checkpoint.

    megamor convert from-hf HF_DIR OUT                                   # vanilla, same depth
    megamor convert from-hf HF_DIR OUT --init stepwise model.arch=mor model.num_recursions=3 \
        model.sharing=middle_cycle model.num_layers=32                   # MoR, for up-training

A MoR or recursive model exported by megamor itself (`megamor convert to-hf`, model_type
`megamor_mor`) imports as the same model: its config.json records the architecture, the routers
and the unrolled plan, and every unique layer and router comes back as it was (MoR -> HF -> MoR
gives equal logits); `--init` does not apply, and options that would change the model are refused.

The result is a *weights-only* checkpoint: the model's megatron `dist_checkpointing` shards under
the same layout-independent keys as a training checkpoint (so any TP/PP layout loads it), the
tokenizer, the resolved `config.yaml` and `megamor.json` (written last, `"kind": "weights"`). It
has no optimizer or trainer state: start a run from it with `checkpoint.init_from=OUT`; the
inference-side tools (`load_for_inference`, export, depth maps) read it like any checkpoint.

A recursive / MoR target takes its shared block from the original layers by one of the
initialisations of Bae et al., "Relaxed Recursive Transformers" (arXiv 2410.20672) and the MoR
authors' code, generalised to any depth (`layer_sources`; the rules are in docs/huggingface.md).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

SUPPORTED = ("llama", "megamor_mor")
MOR_TYPE = "megamor_mor"  # megamor's own MoR / recursive exports (megamor/hf/configuration_mor.py)
# model options a megamor export fixes beyond the shape, and routing options, by config.json key
_MOR_MODEL = {"arch": "arch", "num_recursions": "num_recursions", "sharing": "sharing",
              "kv_sharing": "kv_sharing"}
_MOR_ROUTING = {"type": "router_type", "alpha": "router_alpha", "capacity": "capacities",
                "causal": "causal_routing", "balancing": "balancing",
                "gate_every_step": "gate_every_step"}
INITS = ("average", "stepwise", "lower", "upper", "random")
# Llama tensor names inside one decoder layer, with their shape as a function of the config.
_LAYER_SHAPES = {
    "input_layernorm.weight": lambda c: (c["h"],),
    "post_attention_layernorm.weight": lambda c: (c["h"],),
    "self_attn.q_proj.weight": lambda c: (c["heads"] * c["d"], c["h"]),
    "self_attn.k_proj.weight": lambda c: (c["groups"] * c["d"], c["h"]),
    "self_attn.v_proj.weight": lambda c: (c["groups"] * c["d"], c["h"]),
    "self_attn.o_proj.weight": lambda c: (c["h"], c["heads"] * c["d"]),
    "mlp.gate_proj.weight": lambda c: (c["ffn"], c["h"]),
    "mlp.up_proj.weight": lambda c: (c["ffn"], c["h"]),
    "mlp.down_proj.weight": lambda c: (c["h"], c["ffn"]),
}
# Model fields that only the Hugging Face weights can decide: an override may not change them.
_FIXED = {"hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
          "num_query_groups": "num_key_value_heads", "head_dim": "head_dim",
          "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size"}


class ImportError_(RuntimeError):
    """A Hugging Face model that cannot be imported; the message names the file and field."""


# ----------------------------------------------------------------------------- config.json


def read_hf_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ImportError_(f"{path} not found: {src} is not a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ImportError_(f"{path}: not valid JSON: {e}") from None
    check_supported(hf, path)
    return hf


def _rope_theta(hf: dict) -> float:
    """rope_theta: top level up to transformers 4, inside rope_parameters from transformers 5;
    `rotary_base` in megamor's MoR config."""
    if "rotary_base" in hf:
        return float(hf["rotary_base"])
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def check_supported(hf: dict, path: Path) -> None:
    """Reject model families and Llama features that megamor's network does not have."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ImportError_(f"{path}: model_type {kind!r} is not supported; megamor imports the "
                           f"Llama family and its own MoR exports (model_type: "
                           f"{', '.join(SUPPORTED)})")
    problems = []
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            problems.append(f"{field}=true (megamor's layers have no biases)")
    if not hf.get("tie_word_embeddings", False):  # absent: LlamaConfig's default, untied
        what = "=false" if "tie_word_embeddings" in hf else " absent (Llama's default: false)"
        problems.append(f"tie_word_embeddings{what} (megamor ties the input and output "
                        f"embeddings)")
    if hf.get("rope_scaling"):
        problems.append(f"rope_scaling={hf['rope_scaling']!r} (megamor has plain RoPE only)")
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type not in (None, "default"):
        problems.append(f"rope_parameters.rope_type={rope_type!r} (megamor has plain RoPE only)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (megamor's MLP is SwiGLU: silu)")
    if problems:
        raise ImportError_(f"{path}: unsupported: " + "; ".join(problems))


def hf_model_fields(hf: dict) -> dict:
    """megamor `model` options that follow from a Llama config.json."""
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or h // heads
    mor = {k: hf[v] for k, v in _MOR_MODEL.items() if v in hf} if hf.get("model_type") == MOR_TYPE else {}
    return {
        "arch": "vanilla", **mor, "num_layers": hf["num_hidden_layers"], "hidden_size": h,
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        # None means hidden_size / heads, megamor's default: keeps configs comparable.
        "kv_channels": None if head_dim * heads == h else head_dim,
        "ffn_hidden_size": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
        "rotary_base": _rope_theta(hf), "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "seq_length": min(hf.get("max_position_embeddings", 2048), 2048),
        "init_std": hf.get("initializer_range", 0.02),
    }


def resolve_config(hf: dict, overrides, path: Path):
    """Defaults from config.json, then the user's `section.option=value` overrides."""
    from megamor.config import ConfigError, config_from_dict, parse_override

    fields = hf_model_fields(hf)
    data: dict = {"model": dict(fields)}
    mor = hf.get("model_type") == MOR_TYPE
    exported_routing = {k: hf[v] for k, v in _MOR_ROUTING.items() if v in hf} if mor else {}
    if mor:
        data["routing"] = dict(exported_routing)
    try:
        for text in overrides or ():
            section, option, value = parse_override(text)
            if (section, option) == ("model", "preset"):
                raise ConfigError("model.preset cannot be combined with from-hf: the shape comes "
                                  "from config.json; set model.num_layers, model.arch, ... instead")
            if data.get(section) is None:
                data[section] = {}
            data[section][option] = value
        cfg = config_from_dict(data, "from-hf")
        cfg.validate()
    except ConfigError as e:
        raise ImportError_(f"config error: {e}") from None
    m = cfg.model
    want = {**fields, "head_dim": fields["kv_channels"] or fields["hidden_size"]
            // fields["num_attention_heads"]}
    for field, hf_name in _FIXED.items():
        if getattr(m, field) != want[field]:
            raise ImportError_(f"model.{field}={getattr(m, field)} cannot differ from the Hugging "
                               f"Face weights: {path} has {hf_name}={want[field]}")
    if mor:
        fixed = [("model", k, v, _MOR_MODEL[k]) for k, v in fields.items() if k in _MOR_MODEL]
        fixed += [("model", "num_layers", fields["num_layers"], "num_hidden_layers")]
        fixed += [("routing", k, v, _MOR_ROUTING[k]) for k, v in exported_routing.items()]
        for section, field, value, hf_name in fixed:
            got = getattr(getattr(cfg, section), field)
            if got != value and not (field == "capacity" and list(map(float, got or [])) ==
                                     list(map(float, value))):
                raise ImportError_(f"{section}.{field}={got} cannot differ from the exported "
                                   f"megamor model: {path} has {hf_name}={value}")
    return cfg


# ----------------------------------------------------------------------------- weights


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # several libraries, many error types; name the file
        raise ImportError_(f"{path}: cannot read the weights: {type(e).__name__}: {e}") from None


def read_hf_tensors(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors by Hugging Face name, the file each came from)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (src / single).is_file():
            tensors = _load_file(src / single)
            return tensors, {k: single for k in tensors}
        if (src / index).is_file():
            try:
                weight_map = json.loads((src / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ImportError_(f"{src / index}: not a weight index: {e!r}") from None
            tensors, where = {}, {}
            for shard in sorted(set(weight_map.values())):
                part = _load_file(src / shard)
                for k, v in part.items():
                    tensors[k], where[k] = v, shard
            missing = sorted(k for k in weight_map if k not in tensors)
            if missing:
                raise ImportError_(f"{src / index} lists {missing[0]} in {weight_map[missing[0]]}, "
                                   f"which does not hold it ({len(missing)} such tensors)")
            return tensors, where
    raise ImportError_(f"{src}: no weights found (looked for model.safetensors, "
                       f"model.safetensors.index.json, pytorch_model.bin, "
                       f"pytorch_model.bin.index.json)")


def check_tensors(tensors: dict, where: dict, hf: dict, src: Path) -> None:
    """Every expected tensor present with its shape, nothing else (tied lm_head may repeat)."""
    fields = hf_model_fields(hf)
    c = {"h": fields["hidden_size"], "heads": fields["num_attention_heads"],
         "groups": fields["num_query_groups"], "ffn": fields["ffn_hidden_size"],
         "d": fields["kv_channels"] or fields["hidden_size"] // fields["num_attention_heads"]}
    expected = {"model.embed_tokens.weight": (fields["vocab_size"], c["h"]),
                "model.norm.weight": (c["h"],)}
    mor = hf.get("model_type") == MOR_TYPE  # one set of layer tensors per unique layer
    for i in range(hf.get("num_unique_layers") or fields["num_layers"] if mor else fields["num_layers"]):
        for name, shape in _LAYER_SHAPES.items():
            expected[f"model.layers.{i}.{name}"] = shape(c)
    for name, shape in expected.items():
        if name not in tensors:
            raise ImportError_(f"{src}: tensor {name} is missing from the weights (expected "
                               f"shape {tuple(shape)} from config.json)")
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise ImportError_(f"{src / where[name]}: tensor {name} has shape {got}, config.json "
                               f"implies {tuple(shape)}")
    # Rotary inverse frequencies (old .bin checkpoints) are derived from rope_theta.
    extra = sorted(k for k in tensors if k not in expected and k != "lm_head.weight"
                   and not k.endswith("rotary_emb.inv_freq")
                   and not (mor and k.startswith("model.routers.")))  # checked by _fill
    if extra:
        raise ImportError_(f"{src / where[extra[0]]}: unexpected tensor {extra[0]} with shape "
                           f"{tuple(tensors[extra[0]].shape)} ({len(extra)} unexpected in all); "
                           f"megamor's Llama layers have no such parameter")
    head = tensors.get("lm_head.weight")
    if head is not None and not torch.equal(head, tensors["model.embed_tokens.weight"]):
        raise ImportError_(f"{src / where['lm_head.weight']}: lm_head.weight differs from "
                           f"model.embed_tokens.weight although tie_word_embeddings is true")


# ----------------------------------------------------------------------------- layer mapping


def layer_sources(plan, middle: bool, num_orig: int, init: str) -> dict[int, Optional[list[int]]]:
    """Unique layer -> the original layers whose element-wise mean initialises it (one layer:
    a copy); None: megamor's seeded random init.

    Prelude / coda of middle_* sharing are the first / last original layer; `inner` are the
    original layers between them (all of them otherwise). Unrolled position m (0..D-1, D =
    N_r x B recursive layers; every layer for vanilla) corresponds to inner[floor(m x n / D)],
    n = len(inner), the identity when the depths match. For block index b (0..B-1):
    average  = mean of the distinct layers corresponding to the positions that run b
    stepwise = inner[floor(b x n / B)], layers at a fixed interval (every N_r-th at equal depth)
    lower    = inner[b] (the first B),  upper = inner[n - B + b] (the last B)
    """
    first = 1 if middle else 0
    out: dict[int, Optional[list[int]]] = {}
    if middle:
        if num_orig < 3:
            raise ImportError_(f"sharing with a prelude and coda needs at least 3 original "
                               f"layers, the model has {num_orig}")
        out[0], out[plan.num_unique - 1] = [0], [num_orig - 1]
        inner = list(range(1, num_orig - 1))
    else:
        inner = list(range(num_orig))
    recursive = [l for l in plan.layers if l.step > 0] or list(plan.layers)  # vanilla: all
    n, depth = len(inner), len(recursive)
    B = plan.block_size or plan.num_unique
    if init in ("lower", "upper") and B > n:
        raise ImportError_(f"--init {init} takes {B} distinct original layers for the shared "
                           f"block but only {n} are available; use --init stepwise or average")
    for b in range(B):
        u = b + first
        if init == "random":
            out[u] = None
        elif init == "average":
            out[u] = sorted({inner[m * n // depth] for m, l in enumerate(recursive)
                             if l.unique == u})
        elif init == "stepwise":
            out[u] = [inner[b * n // B]]
        elif init == "lower":
            out[u] = [inner[b]]
        elif init == "upper":
            out[u] = [inner[n - B + b]]
        else:
            raise ImportError_(f"--init {init!r} is not one of {', '.join(INITS)}")
    return out


# ----------------------------------------------------------------------------- the import


def _fill(model, cfg, tensors: dict, sources: dict) -> None:
    """Overwrite the model's imported tensors; routers and `None` sources keep their init."""
    from tqdm import tqdm

    from megamor.hf.weights import layer_from_hf

    m = cfg.model
    sd = model.state_dict()
    emb = sd["embedding.word_embeddings.weight"]
    real = tensors["model.embed_tokens.weight"]
    emb.zero_()  # padding rows stay zero: logit 0, never a target
    emb[: real.shape[0]] = real.to(emb.dtype)
    sd["final_norm.weight"].copy_(tensors["model.norm.weight"])
    cache: dict[int, dict] = {}

    def original(i: int) -> dict:
        if i not in cache:
            cache[i] = layer_from_hf(tensors, f"model.layers.{i}.", m.num_attention_heads,
                                     m.num_query_groups, m.head_dim)
        return cache[i]

    for u, src in tqdm(sorted(sources.items()), desc="layers", unit="layer", leave=False,
                       disable=None):  # no bar unless stderr is a terminal
        if src is None:
            continue
        for name, t in original(src[0]).items():
            # Mean in float64: the average of a few layers without rounding drift.
            value = t if len(src) == 1 else torch.stack(
                [original(i)[name].double() for i in src]).mean(0)
            sd[f"layers.{u}.{name}"].copy_(value.to(sd[f"layers.{u}.{name}"].dtype))
    routers = {k: t for k, t in tensors.items() if k.startswith("model.routers.")}
    if routers:  # a megamor export: its routers (weights and state) come back as they were
        ours = {k for k in sd if k.startswith("routers.")}
        theirs = {k[len("model."):] for k in routers}
        if ours != theirs:
            raise ImportError_(f"router tensors do not match the model: missing "
                               f"{sorted(ours - theirs)[:3]}, unexpected {sorted(theirs - ours)[:3]}")
        for k in ours:
            if tuple(sd[k].shape) != tuple(routers[f"model.{k}"].shape):
                raise ImportError_(f"tensor model.{k} has shape {tuple(routers[f'model.{k}'].shape)}"
                                   f", the model's is {tuple(sd[k].shape)}")
            sd[k].copy_(routers[f"model.{k}"].to(sd[k].dtype))
    model.load_state_dict(sd, strict=True)


def import_hf(src, out, overrides=(), init: str = "stepwise", overwrite: bool = False) -> Path:
    """Import the Hugging Face model directory `src` as a weights-only checkpoint at `out`."""
    from megatron.core import dist_checkpointing

    from megamor.checkpoint import META, identity, now
    from megamor.config import save_config
    from megamor.tokenizer import load_tokenizer
    from megamor.tokenizer.bpe import TokenizerError

    src, out = Path(src), Path(out)
    if init not in INITS:
        raise ImportError_(f"--init {init!r} is not one of {', '.join(INITS)}")
    if out.exists() and not overwrite:
        raise ImportError_(f"{out} already exists; pass --overwrite to replace it")
    hf = read_hf_config(src)
    cfg = resolve_config(hf, overrides, src / "config.json")
    try:
        tok = load_tokenizer(src)
    except TokenizerError as e:
        raise ImportError_(f"{src}: no usable tokenizer: {e}") from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ImportError_(f"{src}: the tokenizer has {tok.vocab_size} entries, more than "
                           f"config.json's vocab_size={cfg.model.vocab_size}")
    tensors, where = read_hf_tensors(src)
    check_tensors(tensors, where, hf, src)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    m = cfg.model
    from megamor.model import plan_for
    plan, _ = plan_for(cfg)
    if hf.get("model_type") == MOR_TYPE:
        exported = [hf.get(k) for k in ("layer_unique", "layer_step", "layer_slot")]
        ours = [[getattr(l, k) for l in plan.layers] for k in ("unique", "step", "slot")]
        if exported != ours:
            raise ImportError_(f"{src / 'config.json'}: its unrolled plan (layer_unique, "
                               f"layer_step, layer_slot) is not the one this megamor builds for "
                               f"arch={m.arch}, sharing={m.sharing}, num_recursions="
                               f"{m.num_recursions}")
        sources = {u: [u] for u in range(plan.num_unique)}
        init = "megamor export"
    else:
        middle = m.arch != "vanilla" and m.sharing.startswith("middle")
        sources = layer_sources(plan, middle, hf["num_hidden_layers"], init)

    from megamor.inference import build_single_process_model
    model, padded = build_single_process_model(cfg, cfg.model.vocab_size)
    _fill(model, cfg, tensors, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp.{out.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        tok.save(tmp / "tokenizer")
        # The data to train on is the user's choice (tokenized with this tokenizer): a run
        # from this config refuses to start until data.path is set.
        cfg.data.path = None
        save_config(cfg, tmp / "config.yaml")
        meta = {
            "format": 1, "kind": "weights", "saved_at": now(), "step": 0, "consumed_samples": 0,
            "source": str(src.resolve()), "init": init,
            "layer_sources": {str(u): ("random" if s is None else s) for u, s in sources.items()},
            **identity(m, tok, {"tp": 1, "pp": 1, "dp": 1}),
        }
        # Its vocabulary too: `checkpoint.init_from` compares it (checkpoint_meta.check_compatible)
        meta["model"].update(vocab_size=m.vocab_size, padded_vocab_size=padded)
        from megamor.checksums import ALGORITHM, checkpoint_files, compute
        meta["checksum"], meta["files"] = ALGORITHM, compute(tmp, checkpoint_files(tmp))
        (tmp / META).write_text(json.dumps(meta, indent=1))  # last: marks the checkpoint complete
        if out.exists():
            if not overwrite:
                raise ImportError_(f"{out} appeared while importing; pass --overwrite to "
                                   f"replace it")
            old = out.parent / f".old.{out.name}.{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
