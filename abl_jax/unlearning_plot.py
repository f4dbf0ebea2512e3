"""CA and ASR against unlearning epoch, one line per run, and the same runs as a markdown table.

    python -m abl_jax.unlearning_plot --out=docs/img/unlearning_badnets.png \
        ascent=runs/badnets-cpu-abl joint=runs/unl/badnets-joint
"""
from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_curve(workdir: str) -> list[dict]:
  """The curve a run wrote (epoch 0 = before unlearning)."""
  with open(os.path.join(workdir, "unlearning_curve.json")) as f:
    return json.load(f)["curve"]


def plot_curves(curves: dict[str, list[dict]], path: str, title: str = "") -> str:
  """Writes a two-panel PNG (CA, ASR against unlearning epoch) with one line per named curve."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for label, curve in curves.items():
    epochs = [c["epoch"] for c in curve]
    for ax, key in zip(axes, ("clean_accuracy", "attack_success_rate")):
      values = [c[key] for c in curve]
      ax.plot(epochs, values, marker=".", label=label)
      stops = [c["epoch"] for c in curve if c.get("stopped")]
      if stops:
        ax.axvline(stops[0], color=ax.lines[-1].get_color(), ls=":", lw=1)
  for ax, name in zip(axes, ("clean accuracy (CA)", "attack success rate (ASR)")):
    ax.set_xlabel("unlearning epoch (0 = before)")
    ax.set_ylabel(name)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def table(runs: dict[str, str]) -> str:
  """Markdown rows: CA/ASR before and after unlearning (full test set), epochs run, per named workdir."""
  lines = ["| run | CA before | ASR before | CA after | ASR after | CA change | epochs |",
           "|---|---|---|---|---|---|---|"]
  for label, workdir in runs.items():
    with open(os.path.join(workdir, "results.json")) as f:
      r = json.load(f)
    before = r["unlearning"]["before"]
    stop = r["unlearning"]["stopped_at_epoch"]
    lines.append(f"| {label} | {before['clean_accuracy']:.4f} | {before['attack_success_rate']:.4f} | "
                 f"{r['clean_accuracy']:.4f} | {r['attack_success_rate']:.4f} | "
                 f"{100 * (r['clean_accuracy'] - before['clean_accuracy']):+.1f} pts | "
                 f"{r['unlearning']['epochs_run']}{' (stopped)' if stop else ''} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "unlearning.png")
  title = next((a.split("=", 1)[1] for a in argv if a.startswith("--title=")), "")
  runs = dict(a.split("=", 1) for a in argv if not a.startswith("--"))
  if not runs:
    raise SystemExit("usage: python -m abl_jax.unlearning_plot --out=PNG [--title=T] LABEL=WORKDIR ...")
  print(table(runs))
  print(plot_curves({label: load_curve(w) for label, w in runs.items()}, out, title))


if __name__ == "__main__":
  main(sys.argv[1:])
