"""Held-out learning curves (``flashback train --eval-every``) side by side, with the ratio of two
of them at every step both were scored: issue 4 asks for A.+LoRA+M.T. / P.+LoRA <= 1.03.

    python research/curves.py append_markers=runs/append_markers prepend=runs/prepend \\
        --ratio append_markers/prepend --json curves.json

Each ``NAME=PATH`` is an adapter folder (its run file's ``held_out_curve``, or for a run that did
not finish, ``checkpoints/held_out_curve.json``) or a curve JSON itself (``held_out_curve_*.json``
in research/device_table.sh's logs). Prints a markdown table; ``--json`` writes the rows, ``--png``
a plot (with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashback_ext.pipeline.adapter_io import RUN_FILE  # noqa: E402
from flashback_ext.pipeline.train import CURVE_FILE


def read_curve(path: Path) -> dict[int, float]:
    """``{step: held-out perplexity}`` from an adapter folder or a curve file."""
    try:
        if path.is_dir():
            run = path / RUN_FILE
            points = json.loads(run.read_text()).get("held_out_curve") if run.exists() else None
            if not points and (path / "checkpoints" / CURVE_FILE).exists():
                points = json.loads((path / "checkpoints" / CURVE_FILE).read_text())
        elif path.exists():
            points = json.loads(path.read_text())
        else:
            raise SystemExit(f"curves: {path} does not exist")
        if not points:
            raise SystemExit(f"curves: no held-out curve in {path} (train with --eval-every N)")
        return {int(p["step"]): float(p["perplexity"]) for p in points}
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"curves: unreadable curve in {path} ({exc!r})") from None


def table(curves: dict[str, dict[int, float]], ratio: tuple[str, str] | None) -> tuple[str, list]:
    steps = sorted(set().union(*(c.keys() for c in curves.values())))
    names = list(curves)
    head = ["step", *names] + ([f"{ratio[0]} / {ratio[1]}"] if ratio else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    rows = []
    for step in steps:
        row = {"step": step, **{n: curves[n].get(step) for n in names}}
        if ratio:
            a, b = row[ratio[0]], row[ratio[1]]
            row["ratio"] = a / b if a is not None and b is not None else None
        rows.append(row)
        cells = [str(step)] + [f"{row[n]:.3f}" if row[n] is not None else "—" for n in names]
        if ratio:
            cells.append(f"{row['ratio']:.3f}" if row["ratio"] is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("curves", nargs="+", metavar="NAME=PATH")
    p.add_argument("--ratio", default=None, metavar="A/B", help="two NAMEs: perplexity of A over B")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--png", default=None, help="plot here (needs matplotlib)")
    args = p.parse_args(argv)
    curves = {}
    for item in args.curves:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"curves: expected NAME=PATH, got {item!r}")
        if name in ("step", "ratio") or name in curves:
            raise SystemExit(f"curves: NAME {name!r} is taken (a column, or given twice)")
        curves[name] = read_curve(Path(path))
    ratio = None
    if args.ratio:
        ratio = tuple(args.ratio.split("/"))
        if len(ratio) != 2 or any(n not in curves for n in ratio):
            raise SystemExit(f"curves: --ratio needs two of {', '.join(curves)} as A/B")
    text, rows = table(curves, ratio)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"curves": args.curves, "ratio": args.ratio,
                                               "rows": rows}, indent=1))
    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("curves: matplotlib is not installed, no PNG", file=sys.stderr)
            return 0
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in curves.items():
            ax.plot(sorted(curve), [curve[s] for s in sorted(curve)], marker="o", label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out perplexity")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
