"""A step's numbers, once for every engine: reduced over pipeline and data parallel
(`StepMetrics.reduce`), the dead-token window, the MFU window, router-collapse warnings, the
console line and metrics.jsonl (`Report`, rank 0). Keys: docs/tracking.md."""

from __future__ import annotations

import json
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

from megamor.flops import flops_per_step
from megamor.model.mor_model import MEAN_STATS, dead_token_ratios
from megamor.step_health import RouterAlerts
from megamor.stragglers import line_part


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def router_alerts(m: dict, tokens_per_step: int) -> list[tuple[str, str]]:
    """Early warnings of router collapse from one step's (global) statistics: (kind, text)."""
    out = []
    for k, v in m.items():
        if k.startswith("router/depth") and k.endswith("/tokens") and v < 0.01 * tokens_per_step:
            out.append((k, f"router collapse: {k.split('/')[1]} received "
                           f"{100 * v / tokens_per_step:.2f}% of the tokens at step {m['step']}"))
        if k.endswith("sampling_acc") and m["step"] > 100 and v < 0.6:
            out.append((k, f"{k}: threshold routing agrees with top-k on only {100 * v:.0f}% of "
                           f"tokens at step {m['step']}; inference routing will differ"))
    dead, chance = m.get("router/dead_token_ratio"), m.get("router/dead_token_ratio_chance", 0.0)
    if dead is not None and dead > chance + 0.05:
        out.append(("router/dead_token_ratio",
                    f"router collapse: {100 * dead:.1f}% of sequence positions were never "
                    f"selected past recursion step 1 in the window ending at step {m['step']} "
                    f"(chance level {100 * chance:.1f}%)"))
    return out


def router_warnings(m: dict, tokens_per_step: int) -> list[str]:
    return [text for _, text in router_alerts(m, tokens_per_step)]


class MfuWindow:
    """MFU over the last `size` steps (sum of FLOPs over sum of seconds): single CPU steps vary
    with what else runs on the machine; the window does not jump with them."""

    def __init__(self, size: int):
        self.steps: deque = deque(maxlen=max(1, size))

    def add(self, flops: float, seconds: float, devices: int, peak: float) -> float:
        from megamor.flops import mfu
        self.steps.append((flops, seconds))
        return mfu(sum(f for f, _ in self.steps), sum(s for _, s in self.steps), devices, peak)


class StepMetrics:
    """Turns a step's `StepResult` into its metrics dict, the same on every rank. Every rank
    calls `reduce` every step (it is a collective)."""

    def __init__(self, cfg, dims, device: torch.device, plan, vocab_size: int,
                 num_microbatches: int, peak_flops: Optional[float]):
        self.cfg, self.dims, self.device, self.plan = cfg, dims, device, plan
        self.vocab_size, self.num_microbatches = vocab_size, num_microbatches
        # Peak FLOP/s per device (logging rank only); the logged MFU is the window's average.
        self.peak_flops = peak_flops
        self.mfu_window = MfuWindow(cfg.train.log_interval)
        # Dead-token window: per-position selection counts since the last log line (all ranks).
        self._window_positions: Optional[torch.Tensor] = None
        self._window_sequences = 0

    def logs_at(self, step: int) -> bool:
        """Steps with a console line; each closes a dead-token window."""
        return step % self.cfg.train.log_interval == 0 or step == 1

    def reduce(self, step: int, result, lr: float, seconds: float) -> dict:
        """Gather one step's numbers onto every rank: loss from the last stage (mean over data
        parallel), router statistics from whichever stage computed them (sum over pipeline)."""
        dims, cfg, dev, router = self.dims, self.cfg, self.device, result.router
        # Built and reduced on the device (NCCL takes no CPU tensor), then copied to the host once.
        lm = torch.zeros(1, dtype=torch.float64, device=dev)
        if dims.last_stage and result.losses:
            lm[0] = torch.stack([l.double() for l in result.losses]).mean()
        keys = router.keys
        zero = torch.zeros((), device=dev)
        stats = torch.stack([router.values.get(k, zero) for k in keys]).double() \
            if keys else torch.zeros(0, dtype=torch.float64, device=dev)
        n_layers = len(self.plan.layers)
        counts = torch.tensor([router.token_counts.get(i, 0.0) for i in range(n_layers)],
                              dtype=torch.float64, device=dev)
        positions = self._position_counts(router)
        vec = torch.cat([lm, stats, counts, positions.flatten()])
        dist.all_reduce(vec, group=dims.pp_group)
        dist.all_reduce(vec, group=dims.dp_group)
        vec = vec.cpu()  # the step's one device-to-host copy of its statistics
        vec[0] /= dims.dp
        n = len(keys)
        grad_norm = result.grad_norm
        out = {"step": step, "loss": float(vec[0]), "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "tokens_per_s": cfg.train.global_batch_size * cfg.model.seq_length / max(seconds, 1e-9),
               "seconds": seconds}
        for k, v in zip(keys, vec[1:1 + n].tolist()):
            # Counts are global sums; losses and accuracies are means per micro-batch.
            out[k] = v / (dims.dp * self.num_microbatches) if k.endswith(MEAN_STATS) else v
        layer_tokens = vec[1 + n:1 + n + n_layers].tolist()
        out["layer_tokens"] = layer_tokens
        if positions.numel():
            out.update(self._dead_token_window(step, vec[1 + n + n_layers:].view_as(positions)))
        total = float(cfg.train.global_batch_size * cfg.model.seq_length)
        for l in self.plan.layers:
            if l.first_in_step:
                out[f"frac/step{l.step}"] = layer_tokens[l.index] / total
        # Throughput from a FLOPs model that charges each step for the tokens it processed.
        fl = flops_per_step(cfg.model, self.plan, layer_tokens, cfg.model.seq_length,
                            cfg.train.global_batch_size, self.vocab_size, cfg.routing)
        out["flops"] = fl["total"]
        out["tflops_per_device"] = fl["total"] / max(seconds, 1e-9) / dims.world_size / 1e12
        if self.peak_flops:
            out["mfu"] = self.mfu_window.add(fl["total"], seconds, dims.world_size,
                                             self.peak_flops)
        out["memory/peak_gb"] = peak_memory_gb(dev)
        return out

    def _position_counts(self, router) -> torch.Tensor:
        """[N_r, T] float64 on the device: this stage's per-position selection counts of this step
        (zeros for the steps whose routers live on other stages); empty for models without
        routers."""
        dev = self.device
        if not router.routed:
            return torch.zeros(0, 0, dtype=torch.float64, device=dev)
        nr, t = self.cfg.model.num_recursions, self.cfg.model.seq_length
        pc = router.position_counts
        return torch.stack([pc[r].double() if r in pc
                            else torch.zeros(t, dtype=torch.float64, device=dev)
                            for r in range(1, nr + 1)])

    def _dead_token_window(self, step: int, positions: torch.Tensor) -> dict:
        """Add one step's global per-position counts to the window; at a logged step, return the
        window's dead-token ratios and start a new window."""
        if self._window_positions is None:
            self._window_positions = torch.zeros_like(positions)
        self._window_positions += positions
        self._window_sequences += self.cfg.train.global_batch_size
        if not self.logs_at(step):
            return {}
        out = dead_token_ratios(self._window_positions, self._window_sequences)
        self._window_positions, self._window_sequences = None, 0
        return out


def format_line(m: dict) -> str:
    """The console line of a logged step."""
    parts = [f"step {m['step']:>5}", f"loss {m['loss']:.4f}"]
    aux = [v for k, v in m.items() if k.endswith("aux_loss")]
    if aux:
        parts.append(f"aux {sum(aux):.4f}")
    if "router/balance_loss" in m:
        parts.append(f"bal {m['router/balance_loss']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"tok/s {m['tokens_per_s']:.0f}"]
    # Model TFLOP/s per device (executed FLOPs of the FLOPs model), the figure Megatron users
    # compare; MFU divides it by the peak of the precision that runs.
    parts.append(f"TFLOP/s/dev {m['tflops_per_device']:.3g}")
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    fr = [f"{m[k]:.2f}" for k in sorted(m) if k.startswith("frac/step")]
    if fr:
        parts.append("steps " + "/".join(fr))
    if "router/dead_token_ratio" in m:
        parts.append(f"dead {m['router/dead_token_ratio']:.2f}")
    if line_part(m):
        parts.append(line_part(m))
    return " | ".join(parts)


class Report:
    """Rank 0's record of every step: a line of metrics.jsonl, the metrics to MLflow, warnings
    (step health, router collapse once per window and kind, stragglers) and, at logged steps,
    the console line."""

    def __init__(self, log, tracker, tokens_per_step: int, logs_at):
        self.log, self.tracker, self.tokens_per_step, self.logs_at = \
            log, tracker, tokens_per_step, logs_at
        self.router_alerts = RouterAlerts()

    def step(self, m: dict, health: list[str], straggler: Optional[str]) -> None:
        logged = self.logs_at(m["step"])
        self.router_alerts.add(router_alerts(m, self.tokens_per_step))
        alerts = self.router_alerts.close(m["step"]) if logged else []
        if alerts:
            m["router/warnings"] = len(alerts)
        self.log.write(json.dumps(m) + "\n")
        self.log.flush()
        self.tracker.log_metrics(m["step"], m)
        for w in health:
            print(f"WARNING: {w}", flush=True)
        if "loss_spike" in m:
            self.tracker.set_tags({"megamor.loss_spike": health[-1]})
        if not logged:
            return
        line = format_line(m)
        if self.tracker.backlog:  # the tracking store is unreachable or stalled
            line += f" | mlflow {self.tracker.backlog} metrics buffered"
        print(line, flush=True)
        for w in alerts:
            print(f"WARNING: {w}", flush=True)
        if alerts:
            self.tracker.set_tags({"megamor.router_warning": f"step {m['step']}: "
                                   + " / ".join(alerts)})
        if straggler:
            print(f"WARNING: {straggler}", flush=True)
            self.tracker.set_tags({"megamor.straggler_warning": f"step {m['step']}: {straggler}"})
