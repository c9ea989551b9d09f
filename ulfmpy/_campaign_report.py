"""What ``ulfmpy campaign`` reads back and reports: results, summaries, the picture. Pure
apart from files (matplotlib is imported only to draw)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ulfmpy import campaign as cp

__all__ = ["read_results", "pending", "summarize", "format_summary"]


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """id -> the last result line for it in ``results.jsonl`` (torn lines skipped)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    out[rec["id"]] = rec
    except FileNotFoundError:
        pass
    return out


def pending(todo: list[cp.Schedule], done: dict[str, Any]) -> list[cp.Schedule]:
    """The schedules whose ID has no result yet (resume). Pure."""
    return [s for s in todo if s.id not in done]


def _count(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for r in rows:
        row = table.setdefault(str(r.get(key)), {})
        row[r["class"]] = row.get(r["class"], 0) + 1
    return dict(sorted(table.items()))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per class, family, policy and the escaped share per detector set. Pure."""
    classes = {c: sum(r["class"] == c for r in rows) for c in cp.CLASSES}
    flips = [r for r in rows if any(f.startswith("bitflip") for f in r.get("faults", []))]
    share: dict[str, dict[str, Any]] = {}
    for r in flips:
        d = share.setdefault(str(r.get("detectors", cp.DEFAULT)), {"flip_runs": 0, "escaped_reported": 0})
        d["flip_runs"] += 1
        d["escaped_reported"] += r["class"] == "ESCAPED-REPORTED"
    for d in share.values():
        d["share"] = round(d["escaped_reported"] / d["flip_runs"], 3)
    failing = [{k: r.get(k) for k in ("id", "class", "reason", "first_error", "commands")}
               for r in rows if r["class"] in cp.FAILING]
    return {"runs": len(rows), "classes": classes, "families": _count(rows, "family"),
            "policies": _count(rows, "policy"), "ranks": _count(rows, "ranks"),
            "escaped_share_by_detectors": dict(sorted(share.items())),
            "wall_s": round(sum(r.get("wall_s", 0.0) for r in rows), 1), "failing": failing}


def format_summary(s: dict[str, Any], title: str = "") -> str:
    """The text of ``summary.txt``."""
    short = {"EXACT": "EXACT", "ESCAPED-REPORTED": "ESC-REP", "CLEAR-ERROR": "CLEAR",
             "HANG": "HANG", "WRONG": "WRONG", "LOST": "LOST"}
    lines = [title or "campaign", f"runs {s['runs']}, run time {s['wall_s']} s", ""]
    lines.append("  ".join(f"{c} {n}" for c, n in s["classes"].items()))
    for name, label in (("families", "per family"), ("policies", "per policy"),
                        ("ranks", "per rank count")):
        lines += ["", f"{label:<24}"
                  + "".join(f"{short[c]:>8}" for c in cp.CLASSES)]
        for key, row in s[name].items():
            lines.append(f"  {key:<22}" + "".join(f"{row.get(c, 0):>8}" for c in cp.CLASSES))
    lines += ["", "escaped-reported share of flip runs, per detector set"]
    for det, d in s["escaped_share_by_detectors"].items():
        lines.append(f"  {det:<16} {d['escaped_reported']}/{d['flip_runs']} = {d['share']:.0%}")
    if s["failing"]:
        lines += ["", "failing (HANG / WRONG / LOST)"]
        for f in s["failing"]:
            lines.append(f"  {f['id']} {f['class']}: {f['reason']}")
            lines += [f"      {c}" for c in f.get("commands") or []]
    return "\n".join(lines) + "\n"


# -- one launch ------------------------------------------------------------------------------


def _plot(summary: dict[str, Any], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ulfmpy[plot]'): no PNG"
    fams = list(summary["families"])
    colors = {"EXACT": "#4caf50", "ESCAPED-REPORTED": "#ffc107", "CLEAR-ERROR": "#2196f3",
              "HANG": "#9c27b0", "WRONG": "#f44336", "LOST": "#000000"}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(fams) + 2), 4.5))
    bottom = [0] * len(fams)
    for c in cp.CLASSES:
        vals = [summary["families"][f].get(c, 0) for f in fams]
        if any(vals):
            ax.bar(fams, vals, bottom=bottom, label=c, color=colors[c])
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("runs")
    ax.set_title(title)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


