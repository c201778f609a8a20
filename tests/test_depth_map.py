"""Per-token depth rendering: depths from masks, escaped HTML, a real PNG of the set width."""

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402

from megamor.depth_map import depth_color, depth_per_token, render_html, render_png  # noqa: E402


def test_depth_from_masks_and_token_choice():
    masks = [[True, True, True, True, True, True],  # step 1 (capacity 1)
             [True, False, True, True, False, False],  # step 2: kept 3
             [False, False, True, False, False, False]]  # step 3: kept 1 of those
    assert depth_per_token(step_masks=masks) == [2, 1, 3, 2, 1, 1]
    assert depth_per_token(step_masks=torch.tensor(masks)) == [2, 1, 3, 2, 1, 1]
    assert depth_per_token(depths=torch.tensor([1, 3, 2])) == [1, 3, 2]
    assert depth_per_token(depths=np.array([2, 2])) == [2, 2]
    with pytest.raises(ValueError):
        depth_per_token()
    with pytest.raises(ValueError):
        depth_per_token(step_masks=[[True], [True, False]])


def test_colors_are_ordered_light_to_dark():
    lum = [sum(depth_color(d, 3)) for d in range(4)]
    assert lum == sorted(lum, reverse=True) and len(set(lum)) == 4


def test_html_escapes_text():
    tokens = ["<script>", "alert('x')", " & ", "</script>", "\n", "ok"]
    page = render_html(tokens, [1, 2, 3, 1, 1, 2], max_depth=3, title="a <b> title")
    assert "<script>" not in page and "</script>" not in page
    assert "&lt;script&gt;" in page and "&amp;" in page and "alert(&#x27;x&#x27;)" in page
    assert "a &lt;b&gt; title" in page
    assert page.count('title="depth ') == 6
    for d in range(1, 4):
        assert f">depth {d}</span>" in page  # legend
    # Every token passes step 1: no depth-0 entry unless a token has depth 0.
    assert ">depth 0</span>" not in page
    assert ">depth 0</span>" in render_html(["a", "b"], [0, 2], max_depth=3)
    with pytest.raises(ValueError):
        render_html(["a"], [1, 2], 3)


def test_png_is_a_real_image(tmp_path):
    text = ("def f(x):\n    return x * 2  # $math$ is not parsed\n" * 12).split(" ")
    tokens = [t + " " for t in text]
    depths = [(i * 7) % 4 for i in range(len(tokens))]
    path = render_png(tokens, depths, max_depth=3, path=tmp_path / "depth.png", width_px=800,
                      title="depth map")
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[1] == 800 and img.shape[0] > 100
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    colors = {tuple(np.round(c, 2)) for c in rgb.reshape(-1, 3)[::7]}
    assert len(colors) > 10
    # each depth's background colour appears
    flat = (rgb.reshape(-1, 3) * 255).round()
    for d in range(4):
        c = np.array(depth_color(d, 3))
        assert (np.abs(flat - c).max(axis=1) <= 1).any(), d
    wide = render_png(tokens, depths, 3, tmp_path / "wide.png", width_px=1200)
    img2 = mpimg.imread(wide)
    assert img2.shape[1] == 1200 and img2.shape[0] < img.shape[0]  # fewer wrapped lines
