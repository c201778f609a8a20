"""Per-token recursion depth: how many recursion steps each token went through, as HTML or PNG.

Inputs are plain Python lists (or anything list-like: tensors and arrays are converted), so the
inference hook only has to record, for one sequence, each step's active mask or the token-choice
depths. One colour scale serves both renderers (`depth_color`): light for shallow, dark for deep.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Optional, Sequence

# Anchors of a sequential colour scale (light yellow -> green -> blue -> dark purple), RGB 0..255.
_ANCHORS = [(255, 247, 188), (161, 218, 180), (65, 182, 196), (34, 94, 168), (37, 52, 148),
            (45, 0, 75)]


def _to_list(x) -> list:
    if hasattr(x, "tolist"):
        return x.tolist()
    return list(x)


def depth_per_token(step_masks: Optional[Sequence] = None,
                    depths: Optional[Sequence] = None) -> list[int]:
    """Recursion depth of every token of one sequence.

    `step_masks`: one active mask per recursion step (each of length s, bool/0-1; a [N_r, s]
    tensor also works): depth = number of steps the token was active in (with hierarchical
    expert-choice filtering the masks are nested, so this is the last step it reached).
    `depths`: token-choice assignments (already the depth, 1..N_r), returned as ints.
    Exactly one of the two must be given.
    """
    if (step_masks is None) == (depths is None):
        raise ValueError("give exactly one of step_masks or depths")
    if depths is not None:
        return [int(d) for d in _to_list(depths)]
    masks = [_to_list(m) for m in _to_list(step_masks)]
    if not masks:
        return []
    s = len(masks[0])
    if any(len(m) != s for m in masks):
        raise ValueError("all step masks must have the same length")
    return [sum(1 for m in masks if m[i]) for i in range(s)]


def depth_color(depth: int, max_depth: int) -> tuple[int, int, int]:
    """RGB (0..255) of `depth` on the scale 0..max_depth."""
    t = 0.0 if max_depth <= 0 else min(max(depth / max_depth, 0.0), 1.0)
    pos = t * (len(_ANCHORS) - 1)
    i = min(int(pos), len(_ANCHORS) - 2)
    f = pos - i
    a, b = _ANCHORS[i], _ANCHORS[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))


def legend_depths(depths: list[int], max_depth: int) -> list[int]:
    """The depths a legend shows: 1..max_depth (every token passes recursion step 1), plus any
    other depth that occurs (0 where a first-step capacity below 1 left tokens out)."""
    return sorted(set(range(1, max_depth + 1)) | set(depths))


def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def _check(tokens, depths) -> None:
    if len(tokens) != len(depths):
        raise ValueError(f"{len(tokens)} tokens but {len(depths)} depths")


def render_html(tokens: list[str], depths: list[int], max_depth: int,
                title: Optional[str] = None) -> str:
    """A standalone HTML page: each token a span coloured by its depth (hover shows it), a
    legend, all text escaped; whitespace and line breaks of the tokens are kept."""
    tokens, depths = [str(t) for t in tokens], [int(d) for d in _to_list(depths)]
    _check(tokens, depths)
    spans = []
    for tok, d in zip(tokens, depths):
        bg = depth_color(d, max_depth)
        spans.append(f'<span class="t" style="background:{_hex(bg)};color:{_hex(_text_color(bg))}"'
                     f' title="depth {d}">{html.escape(tok)}</span>')
    legend = "".join(
        f'<span class="t" style="background:{_hex(depth_color(d, max_depth))};'
        f'color:{_hex(_text_color(depth_color(d, max_depth)))}">depth {d}</span> '
        for d in legend_depths(depths, max_depth))
    counts = {d: depths.count(d) for d in legend_depths(depths, max_depth)}
    mean = sum(depths) / len(depths) if depths else 0.0
    summary = ", ".join(f"{d}: {n}" for d, n in counts.items() if n)
    head = html.escape(title) if title else "Recursion depth per token"
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{head}</title><style>"
            "body{font-family:sans-serif;margin:1.5em}"
            ".text{font-family:monospace;white-space:pre-wrap;line-height:1.9;word-break:break-all}"
            ".t{padding:1px 0;border-radius:2px}"
            ".legend .t{padding:2px 6px;margin-right:4px;font-family:monospace}"
            "</style></head><body>"
            f"<h3>{head}</h3>"
            f'<div class="legend">{legend}</div>'
            f'<p>{len(depths)} tokens, mean depth {mean:.2f} (tokens per depth: {summary})</p>'
            f'<div class="text">{"".join(spans)}</div>'
            "</body></html>\n")


def _display_pieces(tok: str) -> list[tuple[str, bool]]:
    """Split a token for drawing: (text, newline_after). Newlines end a line (shown as a return
    symbol), tabs become spaces, other control characters are shown as escapes."""
    out, cur = [], []
    for ch in tok:
        if ch == "\n":
            cur.append("\u21b5")
            out.append(("".join(cur), True))
            cur = []
        elif ch == "\t":
            cur.append("    ")
        elif ch < " " or ch == "\x7f":
            cur.append(ch.encode("unicode_escape").decode())
        else:
            cur.append(ch)
    if cur or not out:
        out.append(("".join(cur), False))
    return out


def render_png(tokens: list[str], depths: list[int], max_depth: int, path,
               width_px: int = 1200, font_size: float = 11.0, title: Optional[str] = None) -> Path:
    """Draw the text with each token's background coloured by its depth, wrapped to `width_px`,
    with a legend of the depth colours below. The image is exactly `width_px` wide; its height
    follows from the number of lines. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Rectangle

    tokens, depths = [str(t) for t in tokens], [int(d) for d in _to_list(depths)]
    _check(tokens, depths)
    dpi = 100
    prop = FontProperties(family="monospace", size=font_size)
    # Monospace: one measured character width places every token (no per-token layout pass).
    probe = Figure(figsize=(1, 1), dpi=dpi)
    renderer = FigureCanvasAgg(probe).get_renderer()
    w10, _, _ = renderer.get_text_width_height_descent("M" * 10, prop, ismath=False)
    char_w = w10 / 10.0
    line_h = font_size * dpi / 72.0 * 1.7
    margin = 12.0
    usable = width_px - 2 * margin
    max_chars = max(1, int(usable // char_w))

    # Lay out: list of (x, line, text, depth)
    boxes, x, line = [], 0, 0
    for tok, d in zip(tokens, depths):
        for text, newline in _display_pieces(tok):
            while text:
                room = max_chars - x
                if len(text) > room and x > 0 and len(text) <= max_chars:
                    x, line = 0, line + 1  # wrap the whole token to the next line
                    continue
                part, text = text[:max_chars - x], text[max_chars - x:]
                boxes.append((x, line, part, d))
                x += len(part)
                if text:
                    x, line = 0, line + 1
            if newline:
                x, line = 0, line + 1
    n_lines = line + 1 if boxes else 1
    title_h = line_h * 1.3 if title else 0.0
    legend_h = line_h * 2.2
    height_px = int(round(margin + title_h + n_lines * line_h + legend_h + margin))

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width_px)
    ax.set_ylim(height_px, 0)  # y grows downwards, in pixels
    ax.axis("off")
    y0 = margin + title_h
    if title:
        ax.text(margin, margin + line_h * 0.5, title, fontproperties=FontProperties(
            family="sans-serif", size=font_size * 1.2, weight="bold"), va="center", ha="left",
            parse_math=False)
    for bx, bl, text, d in boxes:
        bg = depth_color(d, max_depth)
        left, top = margin + bx * char_w, y0 + bl * line_h
        ax.add_patch(Rectangle((left, top + line_h * 0.08), len(text) * char_w, line_h * 0.84,
                               facecolor=_hex(bg), edgecolor="none"))
        ax.text(left, top + line_h * 0.5, text, fontproperties=prop, va="center", ha="left",
                color=_hex(_text_color(bg)), parse_math=False)
    # Legend: one swatch per depth that can occur (1..max_depth, and any other present).
    ly = y0 + n_lines * line_h + line_h * 0.6
    lx = margin
    ax.text(lx, ly + line_h * 0.5, "depth:", fontproperties=prop, va="center", ha="left",
            parse_math=False)
    lx += 8 * char_w
    for d in legend_depths(depths, max_depth):
        bg = depth_color(d, max_depth)
        label = str(d)
        ax.add_patch(Rectangle((lx, ly), (len(label) + 2) * char_w, line_h, facecolor=_hex(bg),
                               edgecolor="#444444", linewidth=0.5))
        ax.text(lx + char_w, ly + line_h * 0.5, label, fontproperties=prop, va="center",
                ha="left", color=_hex(_text_color(bg)), parse_math=False)
        lx += (len(label) + 3) * char_w
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def write_depth_map(out_dir, stem: str, tokens: list[str], depths: list[int], max_depth: int,
                    title: Optional[str] = None, width_px: int = 1200) -> tuple[Path, Path]:
    """Write `<out_dir>/<stem>.html` and `<out_dir>/<stem>.png` of one sequence; returns both."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = out / f"{stem}.html"
    page.write_text(render_html(tokens, depths, max_depth, title=title))
    image = render_png(tokens, depths, max_depth, out / f"{stem}.png", width_px=width_px, title=title)
    return page, image
