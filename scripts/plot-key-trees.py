#!/usr/bin/env python3
"""Draws docs/bench/key-trees.svg: notice bytes and CA writer time of one leave against group
size, on log axes, key trees (v1.1) against v1's individual notices. The figures are the ones in
docs/benchmarks.md ("Key trees"); edit them here when the benchmarks are rerun. No dependencies."""
import math
import sys

SIZES = [10, 100, 1000, 10000]
PANELS = [
    ("Notice bytes of one leave", "bytes", [
        ("v1: one ECIES notice per remaining holder (~350 B each)", "#c0392b",
         [(n, 350 * (n - 1)) for n in SIZES]),
        ("v1.1 key tree: one kind-3 notice (tree-cost)", "#2471a3",
         [(10, 769), (100, 1129), (1000, 1489), (10000, 1969), (100000, 2329)]),
    ]),
    ("CA writer time of one leave", "ms", [
        ("v1 (quva-ca-load membership, release)", "#c0392b",
         [(10, 0.77), (100, 6.46), (1000, 63.0), (10000, 633.0)]),
        ("v1.1 key trees (quva-ca-load membership, p50)", "#2471a3",
         [(10, 0.34), (100, 0.36), (1000, 0.46), (10000, 2.46)]),
        ("v1.1 planner alone (tree-cost)", "#7fb3d5",
         [(10, 0.0388), (100, 0.0441), (1000, 0.0504), (10000, 0.0591), (100000, 0.0658)]),
    ]),
]
W, H, M = 460, 340, 62


def panel(x0, title, unit, series):
    ys = [v for _, _, pts in series for _, v in pts]
    ylo = 10 ** math.floor(math.log10(min(ys)))
    yhi = 10 ** math.ceil(math.log10(max(ys)))
    xlo, xhi = 10, 100000
    px = lambda n: x0 + M + (W - M - 20) * (math.log10(n) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo))
    py = lambda v: H - M + 10 - (H - M - 40) * (math.log10(v) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo))
    out = [f'<text x="{x0 + W / 2}" y="20" text-anchor="middle" font-weight="bold">{title}</text>']
    e = math.log10(ylo)
    while e <= math.log10(yhi) + 1e-9:
        v = 10 ** e
        out.append(f'<line x1="{px(xlo)}" x2="{px(xhi)}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{px(xlo) - 6}" y="{py(v) + 4:.1f}" text-anchor="end" font-size="11">{v:g}</text>')
        e += 1
    for n in [10, 100, 1000, 10000, 100000]:
        out.append(f'<line x1="{px(n):.1f}" x2="{px(n):.1f}" y1="{py(ylo)}" y2="{py(yhi)}" stroke="#ddd"/>')
        out.append(f'<text x="{px(n):.1f}" y="{py(ylo) + 16}" text-anchor="middle" font-size="11">{n:,}</text>')
    out.append(f'<text x="{x0 + W / 2}" y="{H - 14}" text-anchor="middle" font-size="12">holders (log)</text>')
    out.append(f'<text x="{x0 + 14}" y="{H / 2}" font-size="12" transform="rotate(-90 {x0 + 14} {H / 2})" text-anchor="middle">{unit} (log)</text>')
    for i, (label, colour, pts) in enumerate(series):
        path = " ".join(f"{px(n):.1f},{py(v):.1f}" for n, v in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for n, v in pts:
            out.append(f'<circle cx="{px(n):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<text x="{x0 + M + 4}" y="{40 + 14 * i}" font-size="10.5" fill="{colour}">{label}</text>')
    return out


body = []
for i, (title, unit, series) in enumerate(PANELS):
    body += panel(i * W, title, unit, series)
svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(PANELS)}" height="{H}" '
       f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
       + "\n".join(body) + "\n</svg>\n")
out = sys.argv[1] if len(sys.argv) > 1 else "docs/bench/key-trees.svg"
with open(out, "w") as f:
    f.write(svg)
print(out)
