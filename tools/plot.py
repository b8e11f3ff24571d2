"""Draw runs: scores with their 95% intervals, and SFT loss curves, in one PNG.

    python tools/plot.py runs/loop --out runs/loop/report.png           # what loop.py draws
    python tools/plot.py runs/sft runs/aime24_r1.jsonl runs/aime24_greedy.jsonl --out runs/plot.png

Each RUN is one of
  a loop.py folder, or its report.json: the base / teacher / student rows (greedy and pass@1) and the
      student's SFT loss curve, drawn from report.json alone (it holds exactly the numbers drawn);
  an sft.py output folder, or its metrics.jsonl: training loss (and eval loss, if any) per step;
  an eval_aime.py --out file, or its .summary.json: greedy accuracy (--temperature 0) or pass@1 (K samples).
Scores go in the left panel, loss curves in the right; a panel with nothing to draw is left out.

Needs matplotlib, which is optional (not a runtime dependency: only pictures need it):
`pip install matplotlib`, or `bash setup.sh test`. What it is not: a dashboard; it draws what the
files hold and nothing else.
"""
import argparse
import json
import sys
from pathlib import Path


def load_run(path):
    """RUN -> (scores, curves, title). scores: [(group, metric, value, [low, high] or None)], values in
    [0, 1]; curves: [(label, steps, losses)]; title: a loop report's line on what was measured where."""
    p = Path(path)
    if not p.exists():
        raise ValueError("no such file or folder")
    if p.is_dir():
        p = next((p / name for name in ("report.json", "metrics.jsonl") if (p / name).exists()), p)
    if p.suffix == ".jsonl" and Path(f"{p}.summary.json").exists():
        p = Path(f"{p}.summary.json")
    if p.name == "report.json" or p.name.endswith(".summary.json"):
        data = json.loads(p.read_text())
    elif p.name == "metrics.jsonl":
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        name = p.parent.name
        curves = [(f"{name} {key}", [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
                  for key in ("loss", "eval_loss") if any(key in r for r in rows)]
        return [], curves, ""
    else:
        raise ValueError("not a loop folder / report.json, an sft.py folder / metrics.jsonl, "
                         "or an eval_aime.py output / .summary.json")
    if "rows" in data:                         # loop.py's report.json
        k = data["protocol"]["samples"]
        scores = [(f"{row['name']}\n{row['how']}", label, row[metric]["value"], row[metric]["ci95"])
                  for row in data["rows"] for metric, label in (("greedy", "greedy"), ("pass@1", f"pass@1 (K={k})"))]
        loss = data["sft_loss"]
        return scores, [("student SFT loss", loss["step"], loss["loss"])], data["title"]
    m = data["metrics"]
    metric = "greedy" if m["greedy_accuracy"] is not None else f"pass@1 (K={m['samples_per_problem']})"
    return [(p.name.removesuffix(".jsonl.summary.json"), metric, m["pass@1"], m["pass@1_ci95"])], [], ""


def draw(scores, curves, out, title=""):
    """Grouped bars with 95% intervals (left) and loss against step (right), saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")                      # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [kind for kind, items in (("scores", scores), ("curves", curves)) if items]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        if kind == "scores":
            groups = list(dict.fromkeys(s[0] for s in scores))
            metrics = list(dict.fromkeys(s[1] for s in scores))
            width = 0.8 / len(metrics)
            for j, metric in enumerate(metrics):
                items = [(groups.index(g), v, ci) for g, mt, v, ci in scores if mt == metric]
                xs = [i - 0.4 + width * (j + 0.5) for i, _, _ in items]
                values = [100 * v for _, v, _ in items]
                # asymmetric bars: the interval is clipped to [0, 100%]
                err = [[100 * (v - ci[0]) if ci else 0 for _, v, ci in items],
                       [100 * (ci[1] - v) if ci else 0 for _, v, ci in items]]
                ax.bar(xs, values, width, yerr=err, capsize=4, label=metric, color=f"C{j}")
                for x, v, top in zip(xs, values, (v + e for v, e in zip(values, err[1]))):
                    ax.annotate(f"{v:.1f}%", (x, top), xytext=(0, 3), textcoords="offset points", ha="center",
                                va="bottom", fontsize=8)   # above the interval, not hidden by it
            ax.set_xticks(range(len(groups)), groups, fontsize=8)
            ax.set_ylim(0, 105)
            ax.set_ylabel("accuracy (%), 95% interval")
            ax.set_title("held-out score")
            ax.legend(loc="upper left", fontsize=8)
        else:
            for label, steps, losses in curves:
                ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_ylabel("loss (nats per target token)")
            ax.set_title("SFT loss")
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def fail(message):
    """An expected error: one line, exit 2, no traceback."""
    print(f"tools/plot.py: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="loop.py / sft.py folders, eval_aime.py outputs")
    ap.add_argument("--out", default="plot.png", help="the PNG to write (default plot.png)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("needs matplotlib (optional, only for pictures): pip install matplotlib")
    scores, curves, titles = [], [], []
    for run in args.runs:
        try:
            s, c, t = load_run(run)
        except OSError as e:
            fail(f"{run}: {e.strerror or e}")
        except ValueError as e:                # also json.JSONDecodeError
            fail(f"{run}: {e}")
        except (KeyError, TypeError) as e:
            fail(f"{run}: not the file it looks like (missing or odd field {e})")
        scores, curves = scores + s, curves + c
        if t:
            titles.append(t)
    draw(scores, curves, args.out, "\n".join(titles))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
