"""RoPE in MoR layers: cos/sin shared per token set (megamor) against megatron's apply path.

megamor's `Rotary` (megamor/model/attention.py) computes cos/sin once per token set (the full
sequence, each recursion step's gathered set) and every layer that attends over that set reuses
them. megatron's path (`apply_rotary_pos_emb`, what `SelfAttention` does with a `rotary_pos_emb`
from `RotaryEmbedding`) recomputes cos/sin from the angles in every layer, for queries and keys.
Both use megatron's frequencies. Two measurements, each side by side in one process:

1. the RoPE work alone: one token set's cos/sin and its application to the queries and keys of
   `--layers` layers, forward and backward, at the model's head shapes (alternating rounds);
2. the same model both ways: training steps (forward, loss, backward, clip, AdamW) in
   alternating order, losses checked bit-identical, the median step time of each.

    python benchmarks/rope.py                          # issue 13's shape (step_speed.py), seq 512
    python benchmarks/rope.py --seqs 512,2048 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

import megamor.model.mor_model as mor_model
from megamor.config import load_config
from megamor.model import transformer_config
from megamor.model.attention import Rotary, inverse_frequencies
from step_speed import add_shape_args, build, shape


class MegatronRotary:
    """megatron's apply path at a token set's positions: the angles of both halves, cos/sin
    recomputed by `apply_rotary_pos_emb` in every call."""

    config = None  # the model's TransformerConfig

    def __init__(self, positions: torch.Tensor, head_dim: int, base: float):
        ang = positions.to(torch.float32).unsqueeze(-1) * inverse_frequencies(head_dim, base)
        freqs = torch.cat([ang, ang], dim=-1)
        self.freqs = freqs[:, None, None, :] if positions.dim() == 1 else freqs[:, :, None, :]

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return apply_rotary_pos_emb(t, self.freqs, self.config)


def alternating(fns: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    """Wall seconds per call of each function, called in alternating order round by round."""
    times = {k: [] for k in fns}
    names = list(fns)
    for it in range(warmup + steps):
        for name in (names if it % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def run_op(args, seq: int) -> None:
    """RoPE alone for one token set over `args.layers` layers, forward and backward."""
    d = args.hidden // args.heads
    torch.manual_seed(0)
    q = torch.randn(seq, args.batch, args.heads, d, requires_grad=True)
    k = torch.randn(seq, args.batch, args.groups, d, requires_grad=True)
    positions = torch.arange(seq)
    MegatronRotary.config = transformer_config(load_config(None, shape(args, args.nr, seq)).validate(1),
                                               torch.float32)

    def one(cls):
        rope = cls(positions, d, 10000.0)
        out = sum(rope.apply(q).sum() + rope.apply(k).sum() for _ in range(args.layers))
        out.backward()

    times = alternating({"shared": lambda: one(Rotary), "megatron": lambda: one(MegatronRotary)},
                        args.warmup, 10 * args.steps)
    a, b = statistics.median(times["shared"]), statistics.median(times["megatron"])
    print(f"op   seq={seq} batch={args.batch} heads={args.heads}/{args.groups} head_dim={d} "
          f"layers={args.layers}: shared cos/sin {1e3 * a:.2f} ms, megatron apply {1e3 * b:.2f} ms, "
          f"megatron / shared = {b / a:.3f}", flush=True)


def run(args, seq: int) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, seq))
    over = shape(args, args.nr, seq) + args.override
    impls = {"shared cos/sin": Rotary, "megatron apply": MegatronRotary}
    runs = {name: build(over, args.vocab) for name in impls}
    MegatronRotary.config = runs["megatron apply"][1].config
    losses: dict = {name: [] for name in impls}

    def one(name):
        mor_model.Rotary = impls[name]
        _, model, opt = runs[name]
        opt.zero_grad(set_to_none=True)
        model.reset_stats()
        loss = model(input_ids=ids, labels=ids).float().mean()
        losses[name].append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    try:
        times = alternating({name: (lambda n=name: one(n)) for name in impls}, args.warmup, args.steps)
    finally:
        mor_model.Rotary = Rotary
    a, b = (statistics.median(times[n]) for n in impls)
    same = losses["shared cos/sin"] == losses["megatron apply"]
    print(f"step seq={seq} batch={args.batch} hidden={args.hidden} heads={args.heads} N_r={args.nr} "
          f"{' '.join(args.override)} steps={args.steps}: shared cos/sin {1000 * a:.1f} ms, "
          f"megatron apply {1000 * b:.1f} ms, megatron / shared = {b / a:.3f}; losses "
          f"{'bit-identical' if same else 'DIFFER'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqs", default="512")
    ap.add_argument("--nr", type=int, default=3)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8, help="layers sharing one token set (op timing)")
    ap.add_argument("--override", nargs="*", default=[], help="config overrides, e.g. routing.type=token_choice")
    ap.add_argument("--op-only", action="store_true", help="only the RoPE work alone (1.)")
    args = ap.parse_args()
    from megamor import parallel
    from megamor.shims import install_cpu_shims

    install_cpu_shims()
    parallel.initialize(1, 1, torch.device("cpu"))  # megatron's RoPE asks for its CP group
    for seq in [int(x) for x in args.seqs.split(",")]:
        run_op(args, seq)
        if not args.op_only:
            run(args, seq)
    parallel.shutdown()


if __name__ == "__main__":
    main()
