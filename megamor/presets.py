"""Model shape presets: the paper's sizes (MOR_SPEC.md table 1) and tiny CPU shapes.

`num_layers` is the unrolled depth for the paper's MoR setting (N_r = 3, middle-cycle sharing):
1 + B x 3 + 1. For a vanilla model of the paper's depth override it (e.g. 135m: 30 layers);
start-up validation names the right value when depth, N_r and sharing do not fit.

The paper shapes also set their batch (`PRESET_TRAIN`): global batch 256 sequences, what
`megamor plan` assumes by default and what `slurm/pretrain_<preset>.sh` trains with, and that
script's micro-batch (docs/performance.md, "The Slurm defaults").
"""

MODEL_PRESETS: dict[str, dict] = {
    # CPU shapes: seconds per step on 2 cores.
    "tiny": dict(num_layers=8, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=176, seq_length=128, num_recursions=3),
    "tiny-wide": dict(num_layers=8, hidden_size=128, num_attention_heads=8, num_query_groups=4,
                      ffn_hidden_size=352, seq_length=256, num_recursions=3),
    # Paper shapes (Table 6); vocabulary of SmolLM's tokenizer (49,152), sequence 2048.
    "135m": dict(num_layers=32, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                 ffn_hidden_size=1536, seq_length=2048, num_recursions=3, vocab_size=49152),
    "360m": dict(num_layers=32, hidden_size=960, num_attention_heads=15, num_query_groups=5,
                 ffn_hidden_size=2560, seq_length=2048, num_recursions=3, vocab_size=49152),
    "730m": dict(num_layers=26, hidden_size=1536, num_attention_heads=24, num_query_groups=8,
                 ffn_hidden_size=4096, seq_length=2048, num_recursions=3, vocab_size=49152),
    "1p7b": dict(num_layers=26, hidden_size=2048, num_attention_heads=32, num_query_groups=32,
                 ffn_hidden_size=8192, seq_length=2048, num_recursions=3, vocab_size=49152),
}

# train.* defaults of a preset (explicit options win); slurm/pretrain_<preset>.sh DEFAULT_GBS
# and DEFAULT_MBS agree (tests/test_planner.py).
PRESET_TRAIN: dict[str, dict] = {
    "135m": dict(global_batch_size=256, micro_batch_size=8),
    "360m": dict(global_batch_size=256, micro_batch_size=8),
    "730m": dict(global_batch_size=256, micro_batch_size=4),
    "1p7b": dict(global_batch_size=256, micro_batch_size=4),
}
