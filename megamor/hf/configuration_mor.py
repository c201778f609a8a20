"""Configuration of a megamor Mixture-of-Recursions model for transformers.

Shipped inside every MoR / recursive export (loaded with `trust_remote_code=True`); imports only
transformers. The unrolled plan (which unique layer each unrolled layer runs, its recursion step
and its slot inside the step) is stored explicitly, so the modeling code needs no layout logic.
"""

from __future__ import annotations

from transformers import PretrainedConfig

ARCHS = ("vanilla", "recursive", "mor")


class MoRConfig(PretrainedConfig):
    model_type = "megamor_mor"

    def __init__(
        self,
        vocab_size: int = 1024,
        hidden_size: int = 64,
        intermediate_size: int = 176,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        num_hidden_layers: int = 8,
        num_unique_layers: int | None = None,
        layer_unique: list[int] | None = None,
        layer_step: list[int] | None = None,
        layer_slot: list[int] | None = None,
        rms_norm_eps: float = 1e-5,
        rotary_base: float = 10000.0,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        arch: str = "mor",
        num_recursions: int = 3,
        sharing: str = "middle_cycle",
        router_type: str = "expert_choice",
        router_alpha: float = 0.1,
        capacities: list[float] | None = None,
        causal_routing: str = "aux_loss",
        balancing: str = "loss",
        kv_sharing: bool = False,
        gate_every_step: bool = False,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        hidden_act: str = "silu",
        mlp_bias: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.layer_unique = list(layer_unique) if layer_unique is not None else list(range(num_hidden_layers))
        self.layer_step = list(layer_step) if layer_step is not None else [0] * num_hidden_layers
        self.layer_slot = list(layer_slot) if layer_slot is not None else [0] * num_hidden_layers
        self.num_unique_layers = num_unique_layers or (max(self.layer_unique) + 1)
        self.rms_norm_eps = rms_norm_eps
        self.rotary_base = rotary_base
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.arch = arch
        self.num_recursions = num_recursions
        self.sharing = sharing
        self.router_type = router_type
        self.router_alpha = router_alpha
        self.capacities = list(capacities) if capacities is not None else \
            [(num_recursions - r) / num_recursions for r in range(num_recursions)]
        self.causal_routing = causal_routing
        self.balancing = balancing
        self.kv_sharing = kv_sharing
        self.gate_every_step = gate_every_step
        self.use_cache = use_cache
        # transformers' LlamaMLP reads these (megamor's MLP: SwiGLU, no bias).
        self.hidden_act = hidden_act
        self.mlp_bias = mlp_bias
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._check()

    def _check(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        n = self.num_hidden_layers
        for name in ("layer_unique", "layer_step", "layer_slot"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, "
                                 f"num_hidden_layers is {n}")
        if max(self.layer_unique) >= self.num_unique_layers:
            raise ValueError(f"layer_unique refers to layer {max(self.layer_unique)}, "
                             f"num_unique_layers is {self.num_unique_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.arch == "mor" and self.router_type not in ("expert_choice", "token_choice"):
            raise ValueError(f"router_type must be expert_choice or token_choice, got {self.router_type!r}")
        if len(self.capacities) != self.num_recursions:
            raise ValueError(f"capacities has {len(self.capacities)} entries, "
                             f"num_recursions is {self.num_recursions}")
