"""Router health and depth maps during training (docs/tracking.md): the dead-token ratio against a
hand count, collapse warnings, and one two-stage pipeline launch that trains three short runs:
periodic depth maps (checked against `megamor depth-map` on the checkpoint of the same step), the
same run without them (same losses), and a run made to collapse (warnings, also in MLflow)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_ranks
from megamor.model.mor_model import dead_token_ratios
from megamor.training.metrics import router_warnings

# A fixed routing pattern: 3 recursion steps over T = 6 positions, two sequences.
SEQ_A = [[1, 1, 1, 1, 1, 1],  # step 1 (capacity 1)
         [1, 0, 1, 1, 0, 1],  # step 2 keeps 4
         [0, 0, 1, 0, 0, 1]]  # step 3 keeps 2 of those
SEQ_B = [[1, 1, 1, 1, 1, 1],
         [1, 1, 1, 1, 0, 0],
         [1, 0, 0, 1, 0, 0]]


def test_dead_token_ratio_by_hand():
    window = torch.tensor(SEQ_A) + torch.tensor(SEQ_B)  # counts per (step, position)
    r = dead_token_ratios(window, num_sequences=2)
    # Step 2 never picked position 4; step 3 never picked 1 and 4; past step 1: only 4 is dead.
    assert r["router/step2/dead_token_ratio"] == pytest.approx(1 / 6)
    assert r["router/step3/dead_token_ratio"] == pytest.approx(2 / 6)
    assert r["router/dead_token_ratio"] == pytest.approx(1 / 6)
    # Chance level: 8 of 12 step-2 slots selected -> (1 - 2/3)^2.
    assert r["router/dead_token_ratio_chance"] == pytest.approx(1 / 9)
    # One sequence alone: its unselected positions (1 and 4) are dead, which is exactly chance
    # (1 - capacity): a window of one sequence says nothing.
    one = dead_token_ratios(torch.tensor(SEQ_A), num_sequences=1)
    assert one["router/dead_token_ratio"] == pytest.approx(2 / 6)
    assert one["router/dead_token_ratio_chance"] == pytest.approx(2 / 6)
    assert router_warnings({"step": 10, **one}, 6) == []


def test_router_warnings_on_realistic_statistics():
    tokens = 8 * 64
    healthy_ec = {"step": 200, "loss": 5.1, "router/step2/selected": 336.0,
                  "router/step2/sampling_acc": 0.93, "router/step3/sampling_acc": 0.88,
                  "router/dead_token_ratio": 0.0, "router/dead_token_ratio_chance": 3.8e-8}
    assert router_warnings(healthy_ec, tokens) == []
    dead = dict(healthy_ec, **{"router/dead_token_ratio": 0.25})
    (w,) = router_warnings(dead, tokens)
    assert w.startswith("router collapse: 25.0% of sequence positions were never selected past "
                        "recursion step 1") and "step 200" in w
    inference_gap = dict(healthy_ec, **{"router/step3/sampling_acc": 0.55})
    (w,) = router_warnings(inference_gap, tokens)
    assert "router/step3/sampling_acc" in w and "55%" in w
    assert router_warnings(dict(inference_gap, step=50), tokens) == []  # too early to judge
    tc = {"step": 7, "router/depth1/tokens": 510.0, "router/depth2/tokens": 2.0,
          "router/depth3/tokens": 0.0, "router/balance_loss": 1.0}
    assert router_warnings(tc, tokens) == [
        "router collapse: depth2 received 0.39% of the tokens at step 7",
        "router collapse: depth3 received 0.00% of the tokens at step 7"]
    assert router_warnings(dict(tc, **{"router/depth2/tokens": 170.0, "router/depth3/tokens": 170.0,
                                       "router/depth1/tokens": 172.0}), tokens) == []


def test_router_warnings_are_rate_limited():
    """Issue 19 item 7: a collapsing router printed its warnings at every logged step. Now: once
    per logging window and kind, with how many of the window's steps had it, and a warning
    that persists is repeated only every few windows."""
    from megamor.step_health import RouterAlerts

    alerts = RouterAlerts(repeat_windows=3)
    printed = []
    for window in range(5):
        for step in range(10 * window + 1, 10 * window + 11):
            alerts.add([("router/depth3/tokens", f"router collapse: depth3 ... at step {step}")]
                       + ([("router/dead_token_ratio", "dead")] if step % 10 == 0 else []))
        printed.append(alerts.close(10 * window + 10))
    assert printed[0] == ["dead (1 of the last 10 steps)",
                          "router collapse: depth3 ... at step 10 (10 of the last 10 steps)"]
    assert printed[1] == printed[2] == [] and printed[4] == []
    assert printed[3][1].startswith("router collapse: depth3 ... at step 40 (10 of the last 10 "
                                    "steps); repeated at most every 3 log lines")
    alerts.add([])
    assert alerts.close(51) == []
    alerts.add([("router/depth3/tokens", "back")])  # gone, then back: said at once
    assert alerts.close(52) == ["back"]


# ----------------------------------------------------------------------------- one pipeline launch

TEXT = "The quick brown fox jumps over the lazy dog, then the dog sleeps in the sun all day."
COMMON = ["model.preset=tiny", "model.seq_length=64", "train.global_batch_size=8",
          "train.micro_batch_size=2", "train.warmup_steps=1", "train.log_interval=2",
          "parallel.pipeline_model_parallel_size=2",
          # Stage 0: prelude + step 1 (router 1); stage 1: steps 2 and 3 (routers 2, 3) + coda.
          "parallel.pipeline_layers=[3,5]"]
EC = ["model.arch=mor", "routing.type=expert_choice", "train.train_steps=4",
      "checkpoint.save_interval=2"]


def runs(root: Path) -> dict:
    return {
        # Depth maps by default with every checkpoint save (steps 2 and 4), of a fixed text.
        "maps": EC + [f"tracking.depth_map_text={TEXT}"],
        "plain": EC + ["tracking.depth_map_interval=0", "tracking.enabled=false"],
        # Loss-free balancing run backwards: the most loaded depths get the bias, tokens follow.
        # Tracked in the first run's MLflow store (one SQLite store to create, not two).
        "collapse": ["model.arch=mor", "routing.type=token_choice", "routing.balancing=loss_free",
                     "routing.bias_update_rate=-1.0", "train.train_steps=2",
                     "train.log_interval=1", "tracking.depth_map_interval=0",
                     f"tracking.tracking_uri=sqlite:///{root / 'maps' / 'mlflow.db'}"],
    }


@pytest.fixture(scope="module")
def launch(tmp_path_factory, builtin_root):
    root = tmp_path_factory.mktemp("obs")
    out = root / "result.json"
    proc = run_ranks(2, "train_runs.py", ["--root", str(root), "--out", str(out),
                                          "--runs", json.dumps(runs(root)),
                                          f"data.builtin_root={builtin_root}", *COMMON])
    sections = re.split(r"^=== run (\w+)\n", proc.stdout, flags=re.M)
    logs = dict(zip(sections[1::2], sections[2::2]))
    return root, json.loads(out.read_text()), logs


def _depths(page: str) -> tuple[list[int], list[str]]:
    spans = re.findall(r'<span class="t" style="[^"]*" title="depth (\d+)">(.*?)</span>', page, re.S)
    return [int(d) for d, _ in spans], [t for _, t in spans]


def _client(root: Path, name: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{root / 'maps' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("megamor").experiment_id],
                                filter_string=f"attributes.run_name = '{name}'")
    return client, run


@pytest.mark.slow
def test_pipeline_depth_maps_match_the_checkpoint(launch, tmp_path):
    import matplotlib.image as mpimg

    root, _, logs = launch
    run_dir = root / "maps"
    client, run = _client(root, "maps")
    arts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "depth_maps"))
    assert arts == [f"depth_maps/step_0000000{s}.{e}" for s in (2, 4) for e in ("html", "png")]
    got = Path(client.download_artifacts(run.info.run_id, "depth_maps", str(tmp_path / "dl")))
    for s in (2, 4):  # the run directory keeps the same files
        for e in ("html", "png"):
            name = f"step_0000000{s}.{e}"
            assert (got / name).read_bytes() == (run_dir / "depth_maps" / name).read_bytes()
    img = mpimg.imread(got / "step_00000002.png")
    assert img.ndim == 3 and img.shape[1] == 1200 and img.shape[0] > 60
    assert img[..., :3].std() > 0.05  # not blank

    # The same text through the checkpoint of step 2, single process: the same depths.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "megamor.cli", "depth-map",
                           str(run_dir / "checkpoints" / "step_00000002"), "--text", TEXT,
                           "--out", str(tmp_path / "ckpt")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_depths, train_tokens = _depths((got / "step_00000002.html").read_text())
    ckpt_depths, ckpt_tokens = _depths((tmp_path / "ckpt" / "depth_map.html").read_text())
    assert train_tokens == ckpt_tokens and len(train_tokens) > 10
    assert train_depths == ckpt_depths
    # Depths 2 and 3 were decided by routers on the second stage: the gathering brought them.
    assert max(train_depths) == 3 and min(train_depths) == 1
    assert _depths((got / "step_00000004.html").read_text())[1] == train_tokens
    assert "WARNING" not in logs["maps"]  # a healthy run warns of nothing


@pytest.mark.slow
def test_depth_maps_do_not_change_training(launch):
    root, hist, _ = launch
    assert not (root / "plain" / "depth_maps").exists()
    for a, b in zip(hist["maps"], hist["plain"], strict=True):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
        assert a["layer_tokens"] == b["layer_tokens"]


@pytest.mark.slow
def test_dead_token_windows_and_console_line(launch):
    root, hist, logs = launch
    h = {m["step"]: m for m in hist["maps"]}
    # Windows close at the logged steps (1, then every log_interval = 2): {1}, {2}, {3, 4}.
    assert [s for s in h if "router/dead_token_ratio" in h[s]] == [1, 2, 4]
    k2 = 42  # floor(2/3 * 64) step-2 tokens per sequence
    for step, sequences in ((1, 8), (2, 8), (4, 16)):
        m = h[step]
        assert m["router/dead_token_ratio_chance"] == pytest.approx((1 - k2 / 64) ** sequences)
        assert 0.0 <= m["router/dead_token_ratio"] <= m["router/step3/dead_token_ratio"] <= 1.0
        assert m["router/dead_token_ratio"] == m["router/step2/dead_token_ratio"]  # nested steps
    lines = [l for l in logs["maps"].splitlines() if l.startswith("step ")]
    assert [int(l.split("|")[0].split()[1]) for l in lines] == [1, 2, 4]  # one line per interval
    for line, step in zip(lines, (1, 2, 4)):
        assert line.endswith(f"| dead {h[step]['router/dead_token_ratio']:.2f}"), line
        assert len(line) < 160, line


@pytest.mark.slow
def test_collapsing_router_warns_in_log_and_mlflow(launch):
    root, hist, logs = launch
    warnings = [l for l in logs["collapse"].splitlines() if l.startswith("WARNING: ")]
    assert warnings and all("router collapse" in w and "step 2" in w for w in warnings), warnings
    assert any(re.search(r"depth\d received 0\.00% of the tokens", w) for w in warnings)
    h = {m["step"]: m for m in hist["collapse"]}
    assert "router/warnings" not in h[1] and h[2]["router/warnings"] == len(warnings)
    client, run = _client(root, "collapse")
    assert run.data.tags["megamor.router_warning"].startswith("step 2: router collapse")
    assert run.data.metrics["router/warnings"] == len(warnings)
