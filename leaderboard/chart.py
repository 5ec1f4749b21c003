"""The trade-off chart: edit success (ES) against specificity (DNS) per model and protocol, as a static SVG.

One point per leaderboard entry that has both numbers, with its 95% intervals as error bars; an arrow from each
editor to its ``+sadr`` variant (same origin), and the Pareto front (no other point has both higher ES and higher
DNS) as a dashed line. Every text is escaped; each mark carries the ``data-*`` attributes the page's filters use.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from markupsafe import Markup, escape

W, H = 560, 400
ML, MR, MT, MB = 52, 16, 14, 44  # margins: left, right, top, bottom
X_METRIC, Y_METRIC = "ES", "DNS"
KIND_SHAPE = {"pipeline": "circle", "pre": "circle", "submission": "square", "paper": "diamond"}


def _x(v: float) -> float:
    return ML + v * (W - ML - MR)


def _y(v: float) -> float:
    return H - MB - v * (H - MT - MB)


def _marker(kind: str, x: float, y: float, cls: str) -> str:
    shape = KIND_SHAPE.get(kind, "circle")
    if shape == "square":
        return f'<rect class="{cls}" x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9"/>'
    if shape == "diamond":
        return f'<path class="{cls}" d="M{x:.1f} {y - 6:.1f}L{x + 6:.1f} {y:.1f}L{x:.1f} {y + 6:.1f}L{x - 6:.1f} {y:.1f}Z"/>'
    return f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="5"/>'


def _place_label(text: str, x: float, y: float, taken: list) -> tuple[float, float, str] | None:
    """First of right/left/above/below/diagonal spots where the label's box (≈5.6 px per character at 10 px)
    overlaps no marker and no earlier label and stays inside the plot; None (tooltip only) when all collide."""
    w, h = 5.6 * len(text), 10.0
    candidates = [(x + 8, y + 3.5, "start"), (x - 8, y + 3.5, "end"), (x, y - 9, "middle"), (x, y + 16, "middle"),
                  (x + 7, y - 7, "start"), (x - 7, y - 7, "end"), (x + 7, y + 13, "start"), (x - 7, y + 13, "end")]
    for lx, ly, anchor in candidates:
        x0 = lx if anchor == "start" else lx - w if anchor == "end" else lx - w / 2
        box = (x0, ly - h + 1.5, x0 + w, ly + 1.5)
        if box[0] < ML + 1 or box[2] > W - MR - 1 or box[1] < MT + 1 or box[3] > H - MB - 1:
            continue
        if any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
            continue
        taken.append(box)
        return lx, ly, anchor
    return None


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated points (maximising both coordinates), sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def _attrs(entry: Mapping) -> str:
    return " ".join(f'data-{k}="{escape(entry[k])}"' for k in ("editor", "sadr", "origin", "dataset"))


def tradeoff_svg(entries: Iterable[Mapping], protocol: str, title: str) -> Markup:
    """``entries``: dicts with ``label, kind, origin, editor, sadr, dataset, pair`` (pairing key for arrows) and
    ``x``/``y`` (``{"mean", "ci95"}`` of ES and DNS, fractions)."""
    pts = [e for e in entries if e["x"].get("mean") is not None and e["y"].get("mean") is not None]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'class="tradeoff" aria-label="{escape(title)}">', f"<title>{escape(title)}</title>"]
    # axes and grid
    for t in range(0, 101, 20):
        gx, gy = _x(t / 100), _y(t / 100)
        out.append(f'<line class="grid" x1="{gx:.1f}" y1="{MT}" x2="{gx:.1f}" y2="{H - MB}"/>'
                   f'<line class="grid" x1="{ML}" y1="{gy:.1f}" x2="{W - MR}" y2="{gy:.1f}"/>'
                   f'<text class="tick" x="{gx:.1f}" y="{H - MB + 14}" text-anchor="middle">{t}</text>'
                   f'<text class="tick" x="{ML - 6}" y="{gy + 3:.1f}" text-anchor="end">{t}</text>')
    out.append(f'<rect class="frame" x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}"/>')
    out.append(f'<text class="axis" x="{(ML + W - MR) / 2:.1f}" y="{H - 8}" text-anchor="middle">'
               f'{X_METRIC}: edit success (%) →</text>')
    out.append(f'<text class="axis" transform="translate(13 {(MT + H - MB) / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{Y_METRIC}: specificity under distraction (%) →</text>')
    if not pts:
        out.append(f'<text class="empty" x="{(ML + W - MR) / 2:.1f}" y="{(MT + H - MB) / 2:.1f}" '
                   f'text-anchor="middle">no entry has both {X_METRIC} and {Y_METRIC}</text></svg>')
        return Markup("".join(out))
    front = pareto([(e["x"]["mean"], e["y"]["mean"]) for e in pts])
    if len(front) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{_x(x):.1f} {_y(y):.1f}" for i, (x, y) in enumerate(front))
        out.append(f'<path class="pareto" d="{d}"><title>Pareto front</title></path>')
    # arrows: base editor -> its +sadr variant, same origin and pairing key
    by_pair: dict = {}
    for e in pts:
        by_pair.setdefault(e["pair"], {})[e["sadr"]] = e
    for pair in sorted(by_pair, key=str):
        two = by_pair[pair]
        if "false" in two and "true" in two:
            a, b = two["false"], two["true"]
            out.append(f'<line class="sadr-arrow mark" {_attrs(b)} x1="{_x(a["x"]["mean"]):.1f}" '
                       f'y1="{_y(a["y"]["mean"]):.1f}" x2="{_x(b["x"]["mean"]):.1f}" y2="{_y(b["y"]["mean"]):.1f}" '
                       f'marker-end="url(#arrowhead)"/>')
    out.insert(2, '<defs><marker id="arrowhead" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
                  'markerHeight="7" orient="auto-start-reverse"><path d="M0 0L10 5L0 10z" class="arrowhead"/>'
                  '</marker></defs>')
    taken = [(_x(e["x"]["mean"]) - 6, _y(e["y"]["mean"]) - 6, _x(e["x"]["mean"]) + 6, _y(e["y"]["mean"]) + 6)
             for e in pts]  # label boxes must not cover any marker
    labelled: set = set()
    for e in sorted(pts, key=lambda e: (e["kind"] == "paper", e["label"])):  # our points get labels first
        x, y = _x(e["x"]["mean"]), _y(e["y"]["mean"])
        cls = f"pt-{e['kind']} {'sadr' if e['sadr'] == 'true' else 'plain'}"
        tip = (f"{e['label']} — {X_METRIC} {e['x']['mean'] * 100:.2f}, {Y_METRIC} {e['y']['mean'] * 100:.2f} "
               f"({e['origin_text']})")
        g = [f'<g class="pt mark" {_attrs(e)}><title>{escape(tip)}</title>']
        for axis, m in (("x", e["x"]), ("y", e["y"])):
            ci = m.get("ci95")
            if ci:
                lo, hi = max(0.0, m["mean"] - ci), min(1.0, m["mean"] + ci)
                if axis == "x":
                    g.append(f'<line class="err" x1="{_x(lo):.1f}" y1="{y:.1f}" x2="{_x(hi):.1f}" y2="{y:.1f}"/>')
                else:
                    g.append(f'<line class="err" x1="{x:.1f}" y1="{_y(lo):.1f}" x2="{x:.1f}" y2="{_y(hi):.1f}"/>')
        g.append(_marker(e["kind"], x, y, cls))
        same = (e["label"], round(x), round(y))
        spot = None if same in labelled else _place_label(e["label"], x, y, taken)  # e.g. Table 6 and 7 rows
        labelled.add(same)
        if spot is not None:
            lx, ly, anchor = spot
            g.append(f'<text class="lbl" x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">{escape(e["label"])}</text>')
        g.append("</g>")
        out.append("".join(g))
    out.append("</svg>")
    return Markup("".join(out))
