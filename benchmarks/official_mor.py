"""The official MoR implementation (raymin0223/mixture_of_recursions), built at megamor's shapes
for side-by-side timing in benchmarks/perf.py. Nothing of it is vendored: it is imported from the
checkout the user names (`--official PATH`), in an environment with transformers 4.52.4 (its model
files are copies of that release's Llama). docs/performance.md says how to set that up.

Models are built the way its pretrain.py does (`load_model_from_config`, then the sharing
strategy, then `transform_layer_to_mor_*`), from an in-memory config instead of a Hub one, with
torch SDPA attention, fp32, tied embeddings (its recursive class would leave them untied), no KV
cache during training. Its expert-choice transform gives every recursion's layers fresh attention
modules, so their attention weights are not shared (1.05M more parameters than megamor's at the
issue shape; same FLOPs); that is left as it is. One adaptation: its
token-choice layer hands the gathered, padded sets a 2-D padding mask, which its flash-attention-2
path takes but SDPA does not; here it becomes the equivalent 4-D boolean mask (causal among each
sequence's gathered tokens, padding keys masked).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

TRANSFORMERS = "4.52.4"
KINDS = ("vanilla", "recursive", "mor_expert", "mor_token")


class OfficialError(RuntimeError):
    pass


class _Cfg(dict):
    """The attribute-and-`in` access its code expects from an OmegaConf config."""

    def __init__(self, d: dict):
        super().__init__({k: _Cfg(v) if isinstance(v, dict) else v for k, v in d.items()})

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def check(path: str) -> Path:
    """The checkout at `path` and a fitting transformers, or an error saying what to change."""
    root = Path(path).expanduser().resolve()
    needed = ["model/base_model/modeling_llama.py", "model/mor_model/modeling_llama.py",
              "model/recursive_model/modeling_llama.py", "model/sharing_strategy/llama.py"]
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise OfficialError(
            f"--official {path}: not a checkout of raymin0223/mixture_of_recursions (missing "
            f"{', '.join(missing)}); fetch it, e.g. git clone "
            "https://github.com/raymin0223/mixture_of_recursions")
    try:
        import transformers
    except ImportError:
        raise OfficialError(
            f"--official needs transformers=={TRANSFORMERS} in this Python ({sys.executable}); "
            "megamor does not install it: make a separate venv (docs/performance.md)") from None
    if transformers.__version__ != TRANSFORMERS:
        raise OfficialError(
            f"--official: the official model files need transformers=={TRANSFORMERS}, this Python "
            f"({sys.executable}) has {transformers.__version__}; run perf.py from a separate venv "
            f"with it (docs/performance.md, 'One command')")
    return root


def _import(root: Path):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    names = ["model.base_model.modeling_llama", "model.recursive_model.modeling_llama",
             "model.mor_model.modeling_llama", "model.sharing_strategy.llama",
             "model.mor_model.token_choice_router"]
    try:
        return [importlib.import_module(n) for n in names]
    except Exception as e:  # its imports fail in many ways on a wrong checkout or environment
        raise OfficialError(f"--official {root}: importing its model files failed: "
                            f"{type(e).__name__}: {e}") from e


def _sdpa_token_layer(token_mod):
    """Its token-choice layer, with the gathered sets' 2-D padding mask made 4-D for SDPA."""
    base = token_mod.MoRLlamaDecoderLayer

    class SDPATokenChoiceLayer(base):
        def select_tokens_and_batch_with_padding(self, x, attention_mask=None, *args, **kwargs):
            out = super().select_tokens_and_batch_with_padding(x, attention_mask, *args, **kwargs)
            if out[0] is None or out[1] is None or out[1].dim() != 2:
                return out
            keep = out[1] > 0  # [b, k]: real gathered tokens, padding after them
            k = keep.shape[1]
            causal = torch.ones(k, k, dtype=torch.bool, device=keep.device).tril()
            return (out[0], causal[None, None] & keep[:, None, None, :], *out[2:])

    return SDPATokenChoiceLayer


def build(root: Path, kind: str, *, hidden: int, heads: int, groups: int, ffn: int, vocab: int,
          seq: int, nr: int, capacities: list[float], seed: int = 0):
    """The official `kind` model with 2 + 2 * nr unrolled layers (middle-cycle, 2 shared layers
    looped nr times), and its training-step callable's loss function."""
    if kind not in KINDS:
        raise OfficialError(f"official kind {kind!r}: one of {', '.join(KINDS)}")
    base, recursive, mor, sharing, token_mod = _import(root)
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    layers = 2 + 2 * nr
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=groups, max_position_embeddings=seq,
                         tie_word_embeddings=True, use_cache=False, rms_norm_eps=1e-5,
                         attention_bias=False, mlp_bias=False)
    cls = {"vanilla": base.LlamaForCausalLM, "recursive": recursive.LlamaForCausalLM}.get(
        kind, mor.MoRLlamaForCausalLM)
    model = cls._from_config(config, attn_implementation="sdpa", torch_dtype=torch.float32)
    cfg = _Cfg({
        "precision": "fp32", "num_warmup_steps": 0, "gradient_accumulation_steps": 1,
        "recursive": {"enable": True, "base_depth": None, "num_recursion": nr,
                      "sharing": "middle_cycle", "ln_share": True, "initialization": "stepwise"},
        "mor": {"enable": True, "type": kind.split("_")[-1],
                "capacity": ",".join(repr(c) for c in capacities), "rand_router": False,
                "router_type": "linear", "temp": 1.0,
                "z_loss": kind == "mor_token", "z_coeff": 1e-5,
                # the public configs: expert 250720_..._mor_expert_linear_alpha_0.1_sigmoid_aux_loss_0.001,
                # token 250720_..._mor_token_softmax_bal_loss_coeff_0.1_linear_zloss_1e-5
                "expert": {"cap_warmup_step": 0, "router_func": "sigmoid", "alpha": 0.1,
                           "sampling": "aux_loss", "coeff": 0.001, "gating": "weighted"},
                "token": {"bal_warmup_step": 0, "router_func": "softmax", "alpha": 1.0,
                          "balancing": "loss", "coeff": 0.1, "gating": "weighted"}},
    })
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        # its recursive class lacks get_output_embeddings, so post_init leaves the head untied
        model.lm_head.weight = model.model.embed_tokens.weight
    if kind != "vanilla":
        model, _ = sharing.sharing_strategy(cfg, model)
    if kind == "mor_expert":
        model.transform_layer_to_mor_expert(cfg)
    elif kind == "mor_token":
        model.transform_layer_to_mor_token(cfg)
        layer_cls = _sdpa_token_layer(token_mod)
        for layer in model.model.layers:
            if isinstance(layer, token_mod.MoRLlamaDecoderLayer):
                layer.__class__ = layer_cls
    model.train()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        """Its trainer's total loss (util/trainer_pt.py: LM loss + router losses)."""
        out = model(input_ids=ids, labels=ids, num_items_in_batch=ids.numel())
        total = out.loss
        if kind == "mor_expert":
            total = total + cfg.mor.expert.coeff * out.sampling_loss
        elif kind == "mor_token":
            total = total + cfg.mor.token.coeff * out.balancing_loss + cfg.mor.z_coeff * out.router_z_loss
        return total

    return model, loss
