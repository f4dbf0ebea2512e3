"""The results table of a sweep (or of any runs) as markdown and JSON, from the runs' files alone.

    rows = report.collect("runs/table")         # one row per planned or found run, finished or not
    text = report.write("runs/table")           # writes report.md and report.json, returns the markdown
    python -m abl_jax.report --out=unlearning.png "paper=runs/unl/a" "joint=runs/unl/b"  # unlearning variants

A run directory is one with a config.json. Rows come from WORKDIR/table.json (written by the sweep)
when there is one, so that a row not run yet is shown as missing; otherwise from WORKDIR itself or
its sub-directories. A row without results.json is shown as unfinished, with how far it got.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any

from abl_jax import cost, metrics, workdir as workdir_files

ATTACK_NAMES = {"badnets": "BadNets", "blend": "Blend", "sig": "SIG", "clean_label": "clean-label",
                "input_aware": "input-aware", "wanet": "WaNet"}
METRICS = ("train_accuracy", "clean_accuracy", "attack_success_rate", "train_loss", "clean_test_loss",
           "poisoned_test_loss", "train_accuracy_clean_part", "train_accuracy_poisoned_part",
           "train_loss_poisoned_part", "cross_trigger_accuracy", "noise_mode_accuracy", "target_class_accuracy",
           "class_accuracy", "untriggered_target_rate", "floor_asr")
# (row key, header, kind): 'pct' shows a share as a percentage, 'loss' three significant digits.
COLUMNS = (("train_accuracy", "Train acc. (%)", "pct"), ("clean_accuracy", "Test CA (%)", "pct"),
           ("attack_success_rate", "Test ASR (%)", "pct"), ("floor_asr", "Clean model's ASR (%)", "pct"),
           ("target_class_accuracy", "Target-class CA (%)", "pct"),
           ("train_loss", "Train loss", "loss"),
           ("clean_test_loss", "Clean test loss", "loss"), ("poisoned_test_loss", "Poisoned test loss", "loss"),
           ("isolation", "Isolation P / R", "iso"), ("suspected_labels", "Suspected labels", "labels"),
           ("wall_time_s", "Wall time", "time"))
PICTURES = workdir_files.PICTURES


def _json(path: str) -> Any:
  return workdir_files.read_json(path)


def label(attack: str, defense: str, rate: float | None = None) -> str:
  """The row's name in the seed report's words; `rate` (a poison rate) is added when given."""
  if attack == "none":
    return "Model trained with clean data" + (" and ABL" if defense == "abl" else "")
  name = ATTACK_NAMES.get(attack, attack) + ("" if rate is None else f" {100 * rate:g}%")
  return f"Model trained using ABL against {name} attack" if defense == "abl" else f"Model trained with {name} attack"


def _planned_epochs(config: dict[str, Any]) -> int:
  if config["defense"]["name"] == "none":
    return config["train"]["epochs"]
  a = config["abl"]
  return a["isolation_epochs"] + a["finetune_epochs"] + a["unlearning_epochs"]


def _progress(workdir: str, config: dict[str, Any]) -> str:
  """How far an unfinished run got, from its last per-epoch record in the metrics stream."""
  try:
    epochs = metrics.series(metrics.read(workdir), "epoch/loss")
  except ValueError as e:  # Written by an older abl-jax.
    return f"unfinished: {e}"
  last = epochs[-1] if epochs else None
  total = _planned_epochs(config)
  if last is None:
    return f"unfinished: no epoch done (0 of {total})"
  return (f"unfinished: {last['phase']} epoch {last['epoch']} done ({last['global_epoch']} of {total} epochs); "
          "rerun the sweep to resume")


def load_row(workdir: str, name: str, attack: str | None = None, defense: str | None = None,
             rate: float | None = None) -> dict[str, Any]:
  """One row: status ('done', 'unfinished', 'missing'), its metrics where finished, and its pictures."""
  row: dict[str, Any] = {"name": name, "workdir": workdir, "attack": attack, "defense": defense, "poison_rate": rate}
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    row.update(status="missing", detail=f"missing: no run in {workdir}")
  else:
    config = _json(config_path)
    row.update(attack=config["attack"]["name"], defense=config["defense"]["name"],
               target_label=config["attack"].get("target_label"),
               data=config.get("data", {}).get("source"), poison_rate=config["attack"].get("poison_rate"))
    results_path = os.path.join(workdir, "results.json")
    if not os.path.exists(results_path):
      row.update(status="unfinished", detail=_progress(workdir, config))
    else:
      r = _json(results_path)
      iso = r.get("isolation") or {}
      row.update(status="done", detail="done", **{k: r.get(k) for k in METRICS},
                 suspected_labels=r.get("suspected_labels", workdir_files.suspected_labels(iso)),
                 isolation_precision=iso.get("precision"), isolation_recall=iso.get("recall"),
                 wall_time_s=sum(r["wall_time"].values()), wall_time=r["wall_time"],
                 num_train=r.get("num_train"), num_poisoned=r.get("num_poisoned"), versions=r.get("versions"),
                 unlearning_before=(r.get("unlearning") or {}).get("before"), fingerprints=r.get("data"))
  other_rate = name.rsplit("_", 1)[0] not in (row["attack"], name)  # A pair at another rate: badnets_1pct_abl.
  row["label"] = label(row["attack"] or "?", row["defense"] or "?", row["poison_rate"] if other_rate else None)
  row["pictures"] = [p for p in PICTURES if os.path.exists(os.path.join(workdir, p))]
  return row


def _row_order(row: dict[str, Any]) -> tuple:
  """Clean rows first, then by attack; a pair's rows (badnets_1pct_none, badnets_1pct_abl) together."""
  pair = re.sub(r"_(none|abl)$", "", row["name"])
  return (row["attack"] != "none", row["attack"] or "", pair, row["defense"] != "none", row["name"])


def collect(workdir: str) -> list[dict[str, Any]]:
  """The rows of `workdir`: those table.json plans, else the run in it or the runs under it."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir} does not exist; run the table (or an experiment) there first")
  plan_path = os.path.join(workdir, "table.json")
  if os.path.exists(plan_path):
    plan = _json(plan_path)
    return [load_row(os.path.join(workdir, n), n, plan["rows"][n]["attack"], plan["rows"][n]["defense"],
                     plan["rows"][n].get("poison_rate"))
            for n in plan["order"]]
  if os.path.exists(os.path.join(workdir, "config.json")):
    return [load_row(workdir, os.path.basename(os.path.normpath(workdir)))]
  subdirs = sorted(d for d in os.listdir(workdir) if os.path.exists(os.path.join(workdir, d, "config.json")))
  if not subdirs:
    raise FileNotFoundError(f"{workdir} holds no runs (no config.json in it or its sub-directories) and no table.json")
  return sorted((load_row(os.path.join(workdir, d), d) for d in subdirs), key=_row_order)


def _cell(row: dict[str, Any], key: str, kind: str) -> str:
  if row["status"] != "done":
    return "—"
  if kind == "iso":
    p, r = row["isolation_precision"], row["isolation_recall"]
    return "" if p is None else f"{p:.2f} / {'n/a' if r is None else f'{r:.2f}'}"
  value = row[key]
  if kind == "labels":  # The defense's verdict; the attack's target marked (a metric: the defense never reads it).
    if value is None:
      return "–"
    shown = [f"{k} (target)" if row["attack"] != "none" and k == row.get("target_label") else str(k) for k in value]
    return ", ".join(shown) or "none"
  if value is None:
    return "n/a"
  if kind == "pct":
    return f"{100 * value:.1f}"
  if kind == "time":
    return f"{value / 60:.1f} min"
  return f"{value:.3g}"


def markdown(rows: list[dict[str, Any]], base: str = ".") -> str:
  """The table, one line per row, with a status column; then definitions and each row's pictures (linked from `base`)."""
  columns = _columns(rows)
  header = ["Model", *(h for _, h, _ in columns), "Status"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  if "synthetic" in {r.get("data") for r in rows}:
    lines = ["**Synthetic data**: rows marked (synthetic) were trained and tested on generated images "
             "(config.data.source=synthetic, the `smoke` variant's), not CIFAR-10; their numbers check the "
             "pipeline and say nothing about the attacks or ABL.", "", *lines]
  for row in rows:
    name = row["label"] + (" (synthetic)" if row.get("data") == "synthetic" else "")
    cells = [name, *(_cell(row, k, kind) for k, _, kind in columns), row["detail"]]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Train acc. and train loss: on the set the model was trained on (the poisoned set for attacked "
            "rows). CA: the whole clean test set. ASR: non-target-class test images with the trigger, classified "
            "as the target (n/a without an attack). " + (
                "Clean model's ASR: the same, by the table's clean model (config.attack.floor_model), what a model "
                "that never learned the backdoor shows. " if "floor_asr" in (k for k, _, _ in columns) else "") +
            "Isolation P / R: precision and recall of ABL's isolated "
            "examples against the ground truth. Suspected labels: the labels the defense treated as attacked "
            "(spectral signatures, outlier labels), found without the ground truth; (target) marks the attack's "
            "target. Wall time: the run's phases and evaluation."]
  lines += _other_data(rows)
  done = next((r for r in rows if r["status"] == "done" and r.get("versions")), None)
  if done:
    v = done["versions"]
    flags = f", XLA_FLAGS '{v['xla_flags']}'" if v.get("xla_flags") else ""
    lines.append(f"Measured with python {v['python']}, jax {v['jax']}, devices {', '.join(v['devices'])}{flags}.")
  pictures = [f"- {r['name']}: " + ", ".join(f"[{p}]({os.path.relpath(os.path.join(r['workdir'], p), base)})"
                                           for p in r["pictures"])
              for r in rows if r["pictures"]]
  if pictures:
    lines += ["", "Pictures:", *pictures]
  return "\n".join(lines) + "\n"


def _columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str, str], ...]:
  """COLUMNS, without the clean model's ASR where no row measured it."""
  measured = any(r.get("floor_asr") is not None for r in rows)
  return tuple(c for c in COLUMNS if c[0] != "floor_asr" or measured)


def write(workdir: str) -> str:
  """Writes WORKDIR/report.md and WORKDIR/report.json (for a multi-seed sweep, the mean over its seeds' tables, each
  seed's own report in WORKDIR/s<seed>/); returns the markdown."""
  plan_path = os.path.join(workdir, "table.json")
  plan = _json(plan_path) if os.path.exists(plan_path) else {}
  if "seeds" in plan:
    return _write_seeds(workdir, plan["seeds"])
  rows = collect(workdir)
  text = markdown(rows, workdir)
  workdir_files.write_text(os.path.join(workdir, "report.md"), text)
  workdir_files.write_json(os.path.join(workdir, "report.json"),
                           {"rows": rows, "columns": [k for k, _, _ in _columns(rows)]})
  return text


def seed_dir(workdir: str, seed: int) -> str:
  """Where one seed's table of a multi-seed sweep is (WORKDIR/s<seed>)."""
  return os.path.join(workdir, f"s{seed}")


def _write_seeds(workdir: str, seed_list: list[int]) -> str:
  """report.md / report.json of a multi-seed sweep: each seed's table's report, then the mean over the seeds."""
  tables = [seed_dir(workdir, s) for s in seed_list]
  started = [t for t in tables if os.path.exists(os.path.join(t, "table.json"))]
  for t in started:
    write(t)
  if not started:
    text = f"No seed's table has started yet ({', '.join(tables)}); run the sweep first.\n"
    summary, left_out = [], []
  else:
    summary, left_out, other = seeds_summary(started)
    text = _seeds_markdown(started, summary, left_out, other)
    missing = [t for t in tables if t not in started]
    links = ", ".join(f"[{os.path.basename(t)}]({os.path.basename(t)}/report.md)" for t in started)
    text += f"\nEach seed's table: {links}." + (f" Not started: {', '.join(missing)}." if missing else "") + "\n"
  workdir_files.write_text(os.path.join(workdir, "report.md"), text)
  workdir_files.write_json(os.path.join(workdir, "report.json"),
                           {"seeds": seed_list, "tables": tables, "rows": summary, "left_out": left_out})
  return text


def _baseline(name: str) -> str:
  """The no-defense row a row is measured against: <pair>_none, or clean for the clean data's rows."""
  pair = name.rsplit("_", 1)[0]
  return "clean" if pair == "clean" else f"{pair}_none"


def _other_data(rows: list[dict[str, Any]]) -> list[str]:
  """A warning line for each row whose training set differs from its no-defense row's (results.json data.train)."""
  by_name = {r["name"]: r for r in rows}
  out = []
  for row in rows:
    base = by_name.get(_baseline(row["name"]))
    if row["defense"] == "none" or base is None or base is row:
      continue
    mine, theirs = (row.get("fingerprints") or {}).get("train"), (base.get("fingerprints") or {}).get("train")
    if mine and theirs and mine != theirs:
      out.append(f"**Other data**: {row['name']} ({row['workdir']}) was trained on another training set than "
                 f"{base['name']} ({base['workdir']}): their comparison does not hold (a cached attack model or "
                 "the dataset changed between them; results.json data.train).")
  return ["", *out] if out else []


def _training_seconds(row: dict[str, Any]) -> float:
  """A run's training phases and the defense's passes over the training set (wall_time's "scoring", in runs since
  session 23): its wall time but the poisoning and the final evaluation."""
  return sum(v for k, v in row["wall_time"].items() if k not in ("poison", "evaluate"))


def _work_ratio(row: dict[str, Any], base: dict[str, Any]) -> float | None:
  """The defended run's work over its no-defense run's (abl_jax/cost.py); None where a file it counts is missing."""
  try:
    return cost.ratio(row["workdir"], base["workdir"])
  except (OSError, KeyError):  # A run made before results.json kept num_train, or without its metrics.jsonl.
    return None


def _spread(values: list[float | None], scale: float = 100.0, signed: bool = False, digits: int = 1) -> str:
  if any(v is None for v in values):
    return "n/a"
  v = [scale * x for x in values]
  fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
  mean = fmt.format(sum(v) / len(v))
  return mean if len(v) == 1 else f"{mean} ({fmt.format(min(v))} to {fmt.format(max(v))})"


def seeds_summary(workdirs: list[str]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  """The rows finished in every workdir (one workdir per seed, rows named alike), each with its per-seed values
  (in workdir order) of CA, ASR, the untriggered target rate, the clean model's ASR, the target class's CA, and,
  against the same seed's no-defense row, the CA and target-class CA change and the training time's ratio (None
  where a seed lacks it); a line for each row finished in some seeds only, naming the others and why, and one
  naming the rows finished in none; and the warnings for those rows trained on other data than their baseline."""
  tables = [{r["name"]: r for r in collect(w)} for w in workdirs]
  names = [n for n in tables[0] if all(t.get(n, {}).get("status") == "done" for t in tables)]
  done_somewhere = [n for n in tables[0] if n not in names and any(t.get(n, {}).get("status") == "done" for t in tables)]
  left_out = [f"{n}: " + "; ".join(f"{os.path.basename(os.path.normpath(w))}: {t[n]['detail'] if n in t else 'missing'}"
                                   for w, t in zip(workdirs, tables) if t.get(n, {}).get("status") != "done")
              for n in done_somewhere]
  nowhere = [n for n in tables[0] if n not in names and n not in done_somewhere]
  if nowhere:
    left_out.append("not finished in any seed: " + ", ".join(nowhere))
  summary = []
  for name in names:
    rows = [t[name] for t in tables]
    base = [t.get(_baseline(name)) for t in tables]
    paired = rows[0]["defense"] != "none" and all(b and b["status"] == "done" for b in base)
    values = lambda key: [r.get(key) for r in rows]
    def change(key: str) -> list[float | None] | None:
      if not paired or all(r.get(key) is None for r in rows):
        return None
      return [None if r.get(key) is None or b.get(key) is None else r[key] - b[key] for r, b in zip(rows, base)]

    summary.append({
        "name": name, "label": rows[0]["label"], "workdirs": [r["workdir"] for r in rows],
        **{k: values(k) for k in ("clean_accuracy", "attack_success_rate", "untriggered_target_rate", "floor_asr",
                                  "target_class_accuracy", "suspected_labels")},
        "clean_accuracy_change": change("clean_accuracy"),
        "target_class_accuracy_change": change("target_class_accuracy"),
        "training_time_ratio": ([_training_seconds(r) / _training_seconds(b) for r, b in zip(rows, base)]
                                if paired else None),
        "work_ratio": [_work_ratio(r, b) for r, b in zip(rows, base)] if paired else None,
        "suspected_cells": [_cell(r, "suspected_labels", "labels") for r in rows]})
  other = [line for t in tables for line in _other_data([r for n, r in t.items() if n in names])]
  return summary, left_out, other


def seeds_markdown(workdirs: list[str]) -> str:
  """One line per row finished in every workdir (one workdir per seed): the mean and the range over seeds of
  seeds_summary's values, each seed's suspected labels; the rows left out, and rows trained on other data."""
  return _seeds_markdown(workdirs, *seeds_summary(workdirs))


def _seeds_markdown(workdirs: list[str], summary: list[dict[str, Any]], left_out: list[str], other: list[str]) -> str:
  floor = any(v is not None for row in summary for v in row["floor_asr"])
  title = f"Mean over {len(workdirs)} seeds (min to max)" if len(workdirs) > 1 else "One seed"
  lines = [f"{title}: {', '.join(workdirs)}", "",
           "| Model | CA (%) | ASR (%) | ASR without the trigger (%) | " + ("clean model's ASR (%) | " if floor else "")
           + "target-class CA (%) | CA change (points) | target-class CA change | training time (x no defense) | "
           "work (x no defense) | suspected labels (each seed) |",
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if floor else "")]
  for row in summary:
    change, target_change, time, work = (
        "–" if row[k] is None else _spread(row[k], **kw)
        for k, kw in (("clean_accuracy_change", {"signed": True}), ("target_class_accuracy_change", {"signed": True}),
                      ("training_time_ratio", {"scale": 1.0}), ("work_ratio", {"scale": 1.0, "digits": 2})))
    lines.append(f"| {row['label']} | {_spread(row['clean_accuracy'])} | {_spread(row['attack_success_rate'])} | "
                 f"{_spread(row['untriggered_target_rate'])} | "
                 + (f"{_spread(row['floor_asr'])} | " if floor else "")
                 + f"{_spread(row['target_class_accuracy'])} | {change} | {target_change} | {time} | {work} | "
                 f"{' / '.join(row['suspected_cells'])} |")
  if left_out:
    lines += ["", "Not in the mean (not finished in every seed; each seed's report says how far a row got):",
              *(f"- {line}" for line in left_out)]
  return "\n".join(lines + other) + "\n"


def unlearning_table(runs: dict[str, str]) -> str:
  """Markdown: CA/ASR before and after unlearning (full test set) and epochs run, one row per named run."""
  lines = ["| run | CA before | ASR before | CA after | ASR after | CA change | epochs |",
           "|---|---|---|---|---|---|---|"]
  for name, workdir in runs.items():
    r = _json(os.path.join(workdir, "results.json"))
    before, stop = r["unlearning"]["before"], r["unlearning"]["stopped_at_epoch"]
    lines.append(f"| {name} | {before['clean_accuracy']:.4f} | {before['attack_success_rate']:.4f} | "
                 f"{r['clean_accuracy']:.4f} | {r['attack_success_rate']:.4f} | "
                 f"{100 * (r['clean_accuracy'] - before['clean_accuracy']):+.1f} pts | "
                 f"{r['unlearning']['epochs_run']}{' (stopped)' if stop is not None else ''} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  """Compares unlearning variants: prints their table and draws their curves (LABEL=WORKDIR arguments); with
  --seeds WORKDIR ..., prints the mean and range of the rows over seeds."""
  if argv and argv[0] == "--seeds":
    if len(argv) < 2:
      raise SystemExit("usage: python -m abl_jax.report --seeds WORKDIR ... (one table workdir per seed)")
    print(seeds_markdown(argv[1:]))
    return
  from abl_jax import plots  # matplotlib only where a picture is drawn.
  out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "unlearning.png")
  title = next((a.split("=", 1)[1] for a in argv if a.startswith("--title=")), "")
  runs = dict(a.split("=", 1) for a in argv if not a.startswith("--"))
  if not runs or any(not w for w in runs.values()):
    raise SystemExit("usage: python -m abl_jax.report --out=PNG [--title=T] LABEL=WORKDIR ...")
  print(unlearning_table(runs))
  print(plots.unlearning_curves(runs, out, title))


if __name__ == "__main__":
  main(sys.argv[1:])
