"""The append-adapter goal table: A.+LoRA+M.T. of several adapters against N., P. and P.+LoRA, by
domain and passage length, from ``flashback eval`` JSONs scored on the same examples.

``flashback eval`` fills one A.+LoRA+M.T. row per run, so two append adapters (the paper's
passage positions and "before") are scored in separate runs; their rows carry per-example NLL
sums, so the paired intervals are computed here across runs. The base rows (N., P., P.+LoRA)
are taken from whichever run scored them; where two runs scored the same row, they must agree
(same examples, same model: a check that the runs are comparable).

    python research/goal_table.py in=runs/eval_in_before.json in=runs/eval_in_paper.json \
        out=runs/eval_ood_before.json out=runs/eval_ood_paper.json --json goal.json

Goals (issue 20): in domain A.+LoRA+M.T. <= 1.03x P.+LoRA and below N.; out of domain below N.
and <= 1.05x P., at every passage length. "met" judges the point estimates; the intervals say how
firmly.
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashback_ext.pipeline.evaluate import ratio_interval  # noqa: E402

BASE_ROWS = ("N.", "P.", "P.+LoRA")
GOALS = {"in": {"N.": 1.0, "P.+LoRA": 1.03}, "out": {"N.": 1.0, "P.": 1.05}}


def layout_name(row: dict) -> str:
    """``paper`` or ``before`` (the passage positions), with the context echo where there is one."""
    name = "before" if row.get("passage_positions") == "before" else "paper"
    echo = int(row.get("echo_tokens") or 0)
    return f"{name} + echo {echo}" if echo else name


def load_runs(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: unreadable ({e})") from None
    runs = data.get("runs") or [data]
    for run in runs:
        if "rows" not in run or "passage_tokens" not in run:
            raise SystemExit(f"{path}: not a flashback eval JSON (needs rows and passage_tokens)")
    return runs


def pool(files: list[tuple[str, Path]]) -> dict:
    """``{(domain, passage_tokens): {"base": {name: row}, "append": {layout: row}}}``."""
    cells: dict = {}
    for domain, path in files:
        for run in load_runs(path):
            cell = cells.setdefault((domain, int(run["passage_tokens"])), {"base": {}, "append": {}})
            for row in run["rows"]:
                if row["name"] in BASE_ROWS:
                    seen = cell["base"].get(row["name"])
                    if seen is not None and not math.isclose(seen["ppl"], row["ppl"], rel_tol=1e-5):
                        raise SystemExit(f"{path}: {row['name']} at {run['passage_tokens']} tokens "
                                         f"scores {row['ppl']:.6f}, another run {seen['ppl']:.6f}: "
                                         "not the same examples or model")
                    cell["base"].setdefault(row["name"], row)
                elif row["name"] == "A.+LoRA+M.T.":
                    layout = layout_name(row)
                    if layout in cell["append"]:  # two adapters of one layout: which is which?
                        raise SystemExit(f"{path}: a second {layout!r} A.+LoRA+M.T. row at "
                                         f"{run['passage_tokens']} tokens; pool one per layout")
                    cell["append"][layout] = row
    return cells


def goal_rows(cells: dict) -> list[dict]:
    out = []
    for (domain, tokens), cell in sorted(cells.items()):
        for layout, row in sorted(cell["append"].items()):
            ratios = {}
            for name, ref in cell["base"].items():
                ratio, low, high = ratio_interval(row, ref)
                ratios[name] = {"ratio": ratio, "low": low, "high": high}
            goal = GOALS.get(domain, {})
            checked = {n: ratios[n]["ratio"] <= limit if n != "N." else ratios[n]["ratio"] < limit
                       for n, limit in goal.items() if n in ratios}
            out.append({"domain": domain, "passage_tokens": tokens, "layout": layout,
                        "ppl": row["ppl"], "base_ppl": {n: r["ppl"] for n, r in cell["base"].items()},
                        "ratios": ratios,
                        "met": all(checked.values()) if len(checked) == len(goal) else None})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| domain | passage tokens | layout | N. | P. | P.+LoRA | A.+LoRA+M.T. | / N. | / P. "
             "| / P.+LoRA | goal |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        base = [f"{r['base_ppl'][n]:.3f}" if n in r["base_ppl"] else "—" for n in BASE_ROWS]
        ratios = [f"{r['ratios'][n]['ratio']:.3f} ({r['ratios'][n]['low']:.3f}-"
                  f"{r['ratios'][n]['high']:.3f})" if n in r["ratios"] else "—" for n in BASE_ROWS]
        met = {True: "met", False: "missed", None: "—"}[r["met"]]
        lines.append(f"| {r['domain']} | {r['passage_tokens']} | {r['layout']} | " + " | ".join(base)
                     + f" | {r['ppl']:.3f} | " + " | ".join(ratios) + f" | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="DOMAIN=JSON",
                   help="in=... for the training corpus's held-out examples, out=... for another")
    p.add_argument("--json", default=None, help="also write the table's rows here")
    args = p.parse_args(argv)
    files = []
    for item in args.files:
        domain, sep, path = item.partition("=")
        if not sep or domain not in GOALS:
            raise SystemExit(f"expected in=JSON or out=JSON, got {item!r}")
        files.append((domain, Path(path)))
    rows = goal_rows(pool(files))
    if not rows:
        raise SystemExit("no A.+LoRA+M.T. row in the given files")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "goals": GOALS,
                                               "files": [f"{d}={p}" for d, p in files]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
