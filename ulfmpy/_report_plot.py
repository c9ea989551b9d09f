"""The timeline picture of ``ulfmpy report --plot``: one lane per logical rank.

Draws the ``timeline`` of :func:`ulfmpy.report.build`: segments (alternating
greys), re-executions coloured by rollback round, checkpoint saves, flips,
detections, kills and failures, recovery phases, processes joining as
replacements, launch starts, and a top lane of interval decisions.
"""

from __future__ import annotations

from typing import Any

_PHASE_COLOURS = {"revoke": "#d62728", "shrink": "#ff7f0e", "agree": "#bcbd22",
                  "respawn": "#9467bd", "spares": "#8c564b", "split": "#e377c2",
                  "restore": "#17becf", "unfinished repair": "#f7b6d2"}
_ROUND_COLOURS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#d62728")


def draw(rep: dict[str, Any], path: str) -> None:
    """Write the timeline of ``rep`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tl = rep["timeline"]
    lanes = sorted(tl["lanes"], key=int)
    n = len(lanes)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.55 * (n + 1)))
    y_of = {lane: n - i for i, lane in enumerate(lanes)}
    top = n + 1
    for lane in lanes:
        y = y_of[lane]
        segs = [it for it in tl["lanes"][lane] if it["kind"] == "segment"]
        for i, it in enumerate(segs):
            ax.broken_barh([(it["t0"], max(it["t1"] - it["t0"], 1e-4))], (y - 0.3, 0.6),
                           color="#c7c7c7" if i % 2 else "#a0a0a0", lw=0)
        for it in tl["lanes"][lane]:
            k = it["kind"]
            if k == "reexecution":
                col = _ROUND_COLOURS[(int(it["round"]) - 1) % len(_ROUND_COLOURS)]
                ax.broken_barh([(it["t0"], max(it["t1"] - it["t0"], 1e-4))], (y - 0.3, 0.6),
                               color=col, lw=0)
            elif k == "phase":
                ax.broken_barh([(it["t0"], max(it["t1"] - it["t0"], 1e-4))], (y - 0.42, 0.84),
                               color=_PHASE_COLOURS.get(it["phase"], "#7f7f7f"), lw=0)
            elif k == "checkpoint":
                ax.plot([it["t"]], [y + 0.38], marker="v", color="#2ca02c", ms=5)
            elif k == "flip":
                ax.plot([it["t"]], [y], marker="*", color="#ff7f0e", ms=11, mec="k", mew=0.5)
            elif k == "detection":
                ax.plot([it["t"]], [y + 0.22], marker="D", color="#1f77b4", ms=5)
            elif k == "kill":
                ax.plot([it["t"]], [y], marker="X", color="#d62728", ms=11, mec="k", mew=0.5)
            elif k == "stall":
                ax.plot([it["t"]], [y], marker="s", color="#8c564b", ms=8, mec="k", mew=0.5)
            elif k == "failure":
                ax.plot([it["t"]], [y - 0.38], marker="^", color="#d62728", ms=4)
            elif k == "join":
                ax.plot([it["t"]], [y], marker="o", color="#9467bd", ms=8, mfc="none", mew=2)
    for d in tl["marks"]:
        ax.plot([d["t"]], [top], marker="|", color="k", ms=14)
        ax.annotate(f"{d['steps']}", (d["t"], top), textcoords="offset points", xytext=(2, 6),
                    fontsize=7)
    for la in rep["launches"]:
        ax.axvline(la["start_s"], color="k", ls="--", lw=0.8)
        ax.annotate(f"launch {la['index']}", (la["start_s"], top + 0.45), fontsize=7)
    ax.set_yticks([top] + [y_of[lane] for lane in lanes])
    ax.set_yticklabels(["interval\ndecisions"] + [f"rank {lane}" for lane in lanes])
    ax.set_ylim(0.3, top + 0.8)
    ax.set_xlabel("seconds since the first start")
    title = f"{rep['run_dir']}: {rep['steps']} steps, {len(rep['launches'])} launch(es)"
    ax.set_title(title, fontsize=9)
    # The legend names what this run has, nothing else.
    items = [it for lane in lanes for it in tl["lanes"][lane]]
    kinds = {it["kind"] for it in items}
    rounds = sorted({int(it["round"]) for it in items if it["kind"] == "reexecution"})
    phases = [p for p in _PHASE_COLOURS if any(it.get("phase") == p for it in items)]
    marks = [("checkpoint", "v", "#2ca02c", "checkpoint save"), ("flip", "*", "#ff7f0e", "bit flip"),
             ("detection", "D", "#1f77b4", "detection"), ("kill", "X", "#d62728", "kill"),
             ("stall", "s", "#8c564b", "stall"), ("failure", "^", "#d62728", "failure seen")]
    handles = [Patch(color="#a0a0a0", label="segment"),
               *[Patch(color=_ROUND_COLOURS[(r - 1) % len(_ROUND_COLOURS)],
                       label=f"re-execution round {r}") for r in rounds],
               *[Patch(color=_PHASE_COLOURS[p], label=p) for p in phases],
               *[Line2D([], [], marker=m, ls="", color=c, label=label)
                 for kind, m, c, label in marks if kind in kinds]]
    if "join" in kinds:
        handles.append(Line2D([], [], marker="o", ls="", mfc="none", color="#9467bd",
                              label="joins as a replacement"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
