"""Pictures of a run, redrawn from its files (headless matplotlib): curves, isolation histogram, gallery.

    plots.write_run_plots(workdir)   # WORKDIR/curves.png and, for ABL runs, WORKDIR/isolation.png
    plots.gallery([("no defense", "runs/t/sig_none"), ("ABL", "runs/t/sig_abl")], "runs/t/sig_abl/gallery.png")
    plots.unlearning_curves({"paper": "runs/unl/a", "joint": "runs/unl/b"}, "unlearning.png")
"""
from __future__ import annotations

import os
from typing import Any

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from abl_jax import abl, checkpoint, metrics, train, workdir as wd  # noqa: E402

DPI = 90


def epoch_records(workdir: str) -> list[dict]:
  """Per-epoch CA and ASR (the per-epoch test subset) with their phase and global epoch, in order."""
  records = [r for r in metrics.series(metrics.read(workdir), "eval/clean_accuracy") if not r.get("eval/full_test_set")]
  return [{"phase": r["phase"], "global_epoch": r["global_epoch"], "clean_accuracy": r["eval/clean_accuracy"],
           "attack_success_rate": r.get("eval/attack_success_rate")} for r in records]


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with wd.atomic(path) as tmp:
    fig.savefig(tmp, dpi=DPI, format="png")
  plt.close(fig)
  return path


def describe_run(config: dict, defense: bool = True) -> str:
  """Attack, defense, data and model of a config.json: 'badnets 10%, ABL, synthetic data, small_cnn'."""
  attack, d = config["attack"], config.get("data", {})
  what = "no attack" if attack["name"] == "none" else f"{attack['name']} {100 * attack.get('poison_rate', 0):g}%"
  source = {"synthetic": "synthetic data", "tfds": f"tfds {d.get('name', '')}",
            "folder": f"image folder {os.path.basename(str(d.get('path', '')))}"}.get(d.get("source"), "data ?")
  if d.get("train_size"):
    source += f", {d['train_size']} training images"
  model = config.get("model", {}).get("name", "?")
  name = ("ABL, " if config["defense"]["name"] == "abl" else "no defense, ") if defense else ""
  return f"{what}, {name}{source}, {model}"


def plot_curves(workdir: str, path: str) -> str | None:
  """CA and ASR per epoch through the phases, phase boundaries marked; None without per-epoch records."""
  records = epoch_records(workdir)
  if not records:
    return None
  x = [r["global_epoch"] for r in records]
  fig, ax = plt.subplots(figsize=(7, 3.6))
  ax.plot(x, [r["clean_accuracy"] for r in records], marker=".", label="clean accuracy (CA)")
  asr = [r.get("attack_success_rate") for r in records]
  if any(a is not None for a in asr):
    ax.plot(x, [np.nan if a is None else a for a in asr], marker=".", color="tab:red", label="attack success rate (ASR)")
  start = 0
  for i, r in enumerate(records):  # One span per phase, a dotted line where the next begins.
    if i + 1 == len(records) or records[i + 1]["phase"] != r["phase"]:
      ax.text((start + r["global_epoch"]) / 2, 1.02, r["phase"], ha="center", va="bottom", fontsize=8)
      if i + 1 < len(records):
        ax.axvline(r["global_epoch"], color="gray", ls=":", lw=1)
      start = r["global_epoch"]
  ax.set(xlabel="epoch (all phases)", ylabel="share of test images", ylim=(0, 1.1), xlim=(0, max(x) + 0.5))
  ax.grid(alpha=0.3)
  fig.suptitle(describe_run(wd.read_json(os.path.join(workdir, "config.json"))), fontsize=9)
  # Outside the axes, below: inside, it covered the CA line wherever it ran (every corner is used by a run).
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
  fig.tight_layout()
  return _save(fig, path)


def _isolation_arrays(workdir: str, key: str) -> dict[str, np.ndarray] | None:
  """WORKDIR/isolation.npz's arrays where it exists and holds `key` (older runs lack some), else None."""
  path = os.path.join(workdir, "isolation.npz")
  if not os.path.exists(path):
    return None
  saved = wd.load_npz(path)
  return saved if key in saved else None


def plot_isolation(workdir: str, path: str) -> str | None:
  """Histogram of the per-example isolation loss, poisoned vs clean, with the threshold; None without isolation."""
  saved = _isolation_arrays(workdir, "scores")
  if saved is None:
    return None
  scores = np.maximum(saved["scores"].astype(np.float64), 1e-7)  # Log axis: a loss of 0 is drawn at 1e-7.
  threshold = float(scores[saved["isolated"]].max())
  bins = np.logspace(np.log10(scores.min()), np.log10(scores.max()) + 1e-6, 60)
  fig, ax = plt.subplots(figsize=(7, 3.6))
  if "is_poisoned" in saved:
    mask = saved["is_poisoned"].astype(bool)
    ax.hist(scores[~mask], bins=bins, alpha=0.6, color="tab:blue", label=f"clean ({int((~mask).sum())})")
    ax.hist(scores[mask], bins=bins, alpha=0.7, color="tab:red", label=f"poisoned ({int(mask.sum())})")
    iso = saved["isolated"]
    title = (f"isolated {len(iso)}: {int(mask[iso].sum())} poisoned (precision {mask[iso].mean():.2f}, "
             f"recall {mask[iso].sum() / max(mask.sum(), 1):.2f})")
  else:
    ax.hist(scores, bins=bins, color="gray", label="all examples (ground truth not saved with this run)")
    title = f"isolated {len(saved['isolated'])}"
  ax.axvline(threshold, color="black", ls="--", lw=1, label=f"isolation threshold ({threshold:.2g})")
  if "pool" in saved and len(saved["pool"]) > len(saved["isolated"]):
    pool = saved["pool"]  # Drawn as its own outline: ranked over several epochs, it is no threshold here.
    ax.hist(scores[pool], bins=bins, histtype="step", color="tab:purple", lw=1.5,
            label=f"suspicious pool ({len(pool)} examples)")
    if "is_poisoned" in saved:
      title += f"; pool recall {mask[pool].sum() / max(mask.sum(), 1):.2f}"
  ax.set(xscale="log", yscale="log", xlabel="cross-entropy of the isolation model (end of the isolation phase)",
         ylabel="training examples", title=title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_scores_per_class(workdir: str, path: str) -> str | None:
  """Per training label: the isolation loss of each example (clean blue, clean in the pool purple, poisoned red)."""
  saved = _isolation_arrays(workdir, "labels")
  if saved is None:
    return None
  scores = np.log10(np.maximum(saved["scores"].astype(np.float64), 1e-7))
  labels = saved["labels"]
  mask = saved["is_poisoned"].astype(bool) if "is_poisoned" in saved else np.zeros(len(scores), bool)
  in_pool = np.zeros(len(scores), bool)
  if "pool" in saved:
    in_pool[saved["pool"]] = True
  classes = np.unique(labels)
  fig, ax = plt.subplots(figsize=(8, 3.8))
  rng = np.random.default_rng(0)
  parts = ((~mask & ~in_pool, "tab:blue", 1, "clean"), (~mask & in_pool, "tab:purple", 1, "clean, in the pool"),
           (mask, "tab:red", 2, "poisoned"))
  for i, c in enumerate(classes):
    for part, color, size, name in parts:
      y = scores[(labels == c) & part]
      ax.scatter(c + rng.uniform(-0.35, 0.35, len(y)), y, s=size, color=color, alpha=0.4, linewidths=0,
                 label=name if i == 0 else None)
  ax.legend(fontsize=8, loc="lower right", markerscale=4)
  ax.set(xticks=classes, xlabel="training label (poisoned examples in red)",
         ylabel="log10 isolation-model cross-entropy", title="isolation scores per training label")
  fig.tight_layout()
  return _save(fig, path)


def plot_spectral(workdir: str, path: str) -> str | None:
  """Per training label: its examples' isolation-model features projected on the label's top direction (the
  spectral signatures of abl.spectral_outliers), poisoned vs clean, with the cut where the label was flagged;
  None for a run without them."""
  saved = _isolation_arrays(workdir, "spectral_projection")
  if saved is None:
    return None
  projection, labels, cuts = saved["spectral_projection"], saved["labels"], saved["spectral_cut"]
  mask = saved["is_poisoned"].astype(bool) if "is_poisoned" in saved else np.zeros(len(labels), bool)
  suspected = np.zeros(len(labels), bool)
  suspected[saved["suspected"]] = True
  classes = np.arange(len(cuts))
  rows = (len(classes) + 4) // 5
  fig, axes = plt.subplots(rows, 5, figsize=(14, 2.6 * rows), squeeze=False)
  for label, ax in zip(classes, axes.ravel()):
    mine = labels == label
    values = projection[mine]
    bins = np.linspace(values.min(), values.max() + 1e-9, 40) if mine.any() else 10
    ax.hist(values[~mask[mine]], bins=bins, color="tab:blue", alpha=0.6, label="clean")
    if mask[mine].any():
      ax.hist(values[mask[mine]], bins=bins, color="tab:red", alpha=0.7, label="poisoned")
    flagged = not np.isnan(cuts[label])
    if flagged:
      ax.axvline(cuts[label], color="black", ls="--", lw=1,
                 label=f"cut: {int(suspected[mine].sum())} suspects ({int((suspected & mask)[mine].sum())} poisoned)")
      ax.legend(fontsize=7)
    ranks = saved["spectral_pursuit_rank"] if "spectral_pursuit_rank" in saved else np.full(len(cuts), np.nan)
    pursued = "" if np.isnan(ranks[label]) else f", pursuit rank {ranks[label]:.2f}"
    ax.set_title(f"label {label}: skew {saved['spectral_skewness'][label]:.2f}, "
                 f"kurt {saved['spectral_kurtosis'][label]:.2f}{pursued}", fontsize=9,
                 color="tab:red" if flagged else "black")
    ax.set_yscale("log")
  for ax in axes.ravel()[len(classes):]:
    ax.axis("off")
  fig.suptitle("isolation-model features on each label's top direction (a label the pursuit test flagged: on its "
               "most skewed whitened direction; flagged labels in red; suspects right of the cut)", fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_candidates(workdir: str, path: str) -> str | None:
  """Each label's candidate trigger (config.abl.candidate_triggers; mid-grey is no change, the colour scale
  stretched to the largest change of all labels), with its tail's size and, where saved, how many of the tail
  are poisoned; None for a run without them."""
  saved = _isolation_arrays(workdir, "candidate_triggers")
  if saved is None:
    return None
  deltas, labels = saved["candidate_triggers"].astype(np.float32), saved["labels"]
  tail = saved["candidate_tail"].astype(bool) if "candidate_tail" in saved else None
  mask = saved["is_poisoned"].astype(bool) if "is_poisoned" in saved else np.zeros(len(labels), bool)
  scale = max(float(np.abs(deltas).max()), 1e-6)
  rows = (len(deltas) + 4) // 5
  fig, axes = plt.subplots(rows, 5, figsize=(10, 0.4 + 2.5 * rows), squeeze=False)
  for label, ax in enumerate(axes.ravel()):
    ax.axis("off")
    if label >= len(deltas):
      continue
    image = np.clip(0.5 + 0.5 * deltas[label] / scale, 0, 1)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    mine, poisoned = labels == label, 0
    title = f"label {label}"
    if tail is not None:  # Runs before the tails were saved show the triggers alone.
      poisoned = int((tail & mask & mine).sum())
      title += f": tail {int((tail & mine).sum())}" + (f" ({poisoned} poisoned)" if mask.any() else "")
    ax.set_title(f"{title}\nmean |change| {np.abs(deltas[label]).mean():.1f}", fontsize=8,
                 color="tab:red" if poisoned else "black")
  fig.suptitle(f"candidate triggers: each label's pursuit tail's mean image minus the rest's (grey = 0, "
               f"+-{scale:.0f} levels at the ends)", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_judge(workdir: str, path: str) -> str | None:
  """Histogram of the gauge's probability of each pool example's training label, poisoned vs clean, with the
  run's disown_below and own_above splits (a run with config.abl.gauge_epochs); None otherwise."""
  judged, npz = os.path.join(workdir, "returned.npz"), os.path.join(workdir, "isolation.npz")
  if not (os.path.exists(judged) and os.path.exists(npz)):
    return None
  saved, iso = wd.load_npz(judged), wd.load_npz(npz)
  if "judge_loss" not in saved:
    return None
  p_label = np.exp(-saved["judge_loss"].astype(np.float64))
  bins = np.linspace(0.0, 1.0, 41)
  fig, ax = plt.subplots(figsize=(7, 3.6))
  mask = iso["is_poisoned"][iso["pool"]].astype(bool) if "is_poisoned" in iso else np.zeros(len(p_label), bool)
  ax.hist(p_label[~mask], bins=bins, alpha=0.6, color="tab:blue", label=f"clean pool examples ({int((~mask).sum())})")
  if mask.any():
    ax.hist(p_label[mask], bins=bins, alpha=0.7, color="tab:red", label=f"poisoned pool examples ({int(mask.sum())})")
  a = wd.read_json(os.path.join(workdir, "config.json")).get("abl", {})
  for field, color, meaning in (("disown_below", "tab:red", "below: not this label"),
                                ("own_above", "tab:green", "at or above: keeps its label")):
    if 0.0 < a.get(field, 0.0) < 1.0:  # 0 and 1 are off.
      ax.axvline(a[field], color=color, ls="--", lw=1, label=f"{field}={a[field]:g} ({meaning})")
  ax.set(yscale="log", xlabel="the gauge's probability of the training label",
         ylabel="pool examples", title="what a model trained without the pool believes about it")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_rejected(workdir: str, path: str) -> str | None:
  """Per training label, the share of the examples outside the pool whose label the gauge gives less than each
  level of config.abl.class_outlier_below (one panel per level; disown_below alone for runs without levels),
  poisoned and clean, with each label's outlier score there (config.abl.class_outlier_z); None for a run that
  did not judge them."""
  verdicts = wd.outside_verdicts(workdir)
  if verdicts is None:
    return None
  a = wd.read_json(os.path.join(workdir, "config.json")).get("abl", {})
  if not a.get("disown_below"):
    return None
  saved = wd.load_npz(os.path.join(workdir, "returned.npz"))
  own, mask, labels = verdicts.own, verdicts.poisoned, verdicts.labels
  classes = np.arange(verdicts.num_classes)
  counts = np.bincount(labels, minlength=len(classes))
  share = lambda m: np.bincount(labels[m], minlength=len(classes)) / np.maximum(counts, 1)
  levels = list(a.get("class_outlier_below") or [a["disown_below"]])
  z = a.get("class_outlier_z", 0.0)
  fig, axes = plt.subplots(len(levels), 1, figsize=(7, 1.2 + 2.4 * len(levels)), squeeze=False)
  for i, (level, ax) in enumerate(zip(levels, axes[:, 0])):
    clean, poisoned = share((own < level) & ~mask), share((own < level) & mask)
    # Runs since the levels saved each level's scores (with the binomial spread); earlier runs' are recomputed.
    scores = saved["outlier_scores"][i] if "outlier_scores" in saved else abl.outlier_scores(clean + poisoned, counts)
    ax.bar(classes, clean, color="tab:blue", label="clean")
    if mask.any():
      ax.bar(classes, poisoned, bottom=clean, color="tab:red", label="poisoned")
    ax.axhline(np.median((clean + poisoned)[counts > 0]), color="gray", ls=":", lw=1, label="median over labels")
    title, dominant = f"outside the pool, the gauge gives the label < {level:g}", []
    loosest = a.get("class_outlier_below") and level == max(a["class_outlier_below"])
    ratio = a.get("class_outlier_ratio", 0.0) if loosest else 0.0
    if ratio and (counts > 0).sum() >= 2:
      dominant = abl.dominant_label(clean + poisoned, counts, ratio, z)
      title += (f"\nthe top share is {abl.top_share_ratio(clean + poisoned, counts)[1]:.2f}x the next (flagged at "
                f"{ratio:g}x, if improbable)")
    for c in classes:
      flagged = (bool(z) and scores[c] > z) or c in dominant
      ax.annotate(f"{scores[c]:.1f}", (c, clean[c] + poisoned[c]), ha="center", va="bottom", fontsize=8,
                  color="tab:red" if flagged else "black", fontweight="bold" if flagged else "normal")
    ax.set(xticks=classes, ylabel="share", ylim=(0, max(1e-3, float((clean + poisoned).max())) * 1.25),
           title=title)
    ax.title.set_fontsize(10)
    if i == 0:
      ax.legend(fontsize=8)
  axes[-1, 0].set_xlabel(f"training label (above each bar: its outlier score; flagged above {z:g}, in red)")
  fig.tight_layout()
  return _save(fig, path)


def predict_latest(workdir: str, images: np.ndarray, num_classes: int) -> np.ndarray:
  """Predicted classes of `images` by the run's latest checkpoint (its final model once finished)."""
  # This process's devices only: in a multi-process run the primary alone draws pictures.
  predict = checkpoint.latest_predictor(workdir, num_classes, images.shape[1:], train.make_mesh(jax.local_devices()))
  return predict(images, np.zeros(len(images), np.int32))[1]


def load_examples(workdir: str) -> dict[str, np.ndarray]:
  """WORKDIR/examples.npz; for a run from before it was saved, re-poisons the data to write it."""
  path = os.path.join(workdir, "examples.npz")
  if not os.path.exists(path):
    from abl_jax import experiment  # Deterministic in the config: the same data and trigger as the run.
    config = wd.run_config(workdir)
    experiment.save_examples(workdir, experiment.prepare(config), config.attack.target_label)
  return wd.load_npz(path)


def gallery(runs: list[tuple[str, str]], path: str, count: int = 9) -> str | None:
  """Test images (clean, then with the trigger) and each (label, workdir) model's prediction on the triggered one."""
  ex = load_examples(runs[-1][1])
  if not len(ex["labels"]):
    return None
  names, target = [str(n) for n in ex["class_names"]], int(ex["target"])
  clean, triggered, labels = ex["clean"][:count], ex["triggered"][:count], ex["labels"][:count]
  preds = [(name, predict_latest(w, triggered, len(names))) for name, w in runs]
  fig, axes = plt.subplots(2, len(labels), figsize=(1.5 * len(labels), 1.9 + 0.45 * len(runs)), squeeze=False)
  for j, true in enumerate(labels):
    axes[0, j].imshow(clean[j])
    axes[0, j].set_title(names[true], fontsize=8)
    axes[1, j].imshow(triggered[j])
    for k, (name, p) in enumerate(preds):
      color = "tab:red" if p[j] == target else "tab:green" if p[j] == true else "black"
      axes[1, j].text(0.5, -0.08 - 0.2 * k, f"{name}: {names[p[j]]}", color=color, fontsize=7,
                      ha="center", va="top", transform=axes[1, j].transAxes)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0, 0].set_ylabel("clean", fontsize=8)
  axes[1, 0].set_ylabel("trigger", fontsize=8)
  fig.suptitle(f"{describe_run(wd.run_config(runs[-1][1]).to_dict(), defense=False)}: "
               f"{' vs '.join(name for name, _ in runs)}\nbelow each triggered test image, each model's "
               f"prediction: red = the attack's target ({names[target]}), the backdoor worked; green = the true "
               "class; black = another class", fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def write_run_plots(workdir: str) -> list[str]:
  """Writes the run's curves.png and (ABL) isolation.png, scores_per_class.png, (with spectral signatures)
  spectral.png, (with candidate triggers) candidates.png and (with a gauge) judge.png and rejected.png; returns the
  paths written."""
  written = [plot_curves(workdir, os.path.join(workdir, "curves.png")),
             plot_isolation(workdir, os.path.join(workdir, "isolation.png")),
             plot_scores_per_class(workdir, os.path.join(workdir, "scores_per_class.png")),
             plot_spectral(workdir, os.path.join(workdir, "spectral.png")),
             plot_candidates(workdir, os.path.join(workdir, "candidates.png")),
             plot_judge(workdir, os.path.join(workdir, "judge.png")),
             plot_rejected(workdir, os.path.join(workdir, "rejected.png"))]
  return [p for p in written if p]


def load_curve(workdir: str) -> list[dict]:
  """WORKDIR/unlearning_curve.json: CA, ASR and isolated-set accuracy per unlearning epoch (0 = before)."""
  return wd.read_json(os.path.join(workdir, "unlearning_curve.json"))["curve"]


def unlearning_curves(runs: dict[str, str], path: str, title: str = "") -> str:
  """CA and ASR against unlearning epoch, one line per named run, a dotted line where a run stopped."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for label, workdir in runs.items():
    curve = load_curve(workdir)
    epochs = [c["epoch"] for c in curve]
    for ax, key in zip(axes, ("clean_accuracy", "attack_success_rate")):
      ax.plot(epochs, [c[key] for c in curve], marker=".", label=label)
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
  return _save(fig, path)
