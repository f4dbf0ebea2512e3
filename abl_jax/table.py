"""The results-table sweep: every selected row of configs/table.py in WORKDIR/<row>, its pictures, the report.
Each attack row's final evaluation also applies its trigger to the clean row's model, where that row has finished
(config.attack.floor_model). With config.table.seeds ('0,1'), the whole table once per seed in WORKDIR/s<seed>/,
and WORKDIR/report.md the mean and range over the seeds.

    table.run(config, workdir)   # skips finished rows, resumes an interrupted one, writes WORKDIR/report.md
"""
from __future__ import annotations

import ast
import copy
import os
from typing import Any

import ml_collections
from absl import logging

from abl_jax import distributed, experiment, plots, report, workdir as workdir_files


def is_table(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a table (configs/table.py) rather than one experiment."""
  return "rows" in config and "table" in config


def pair(name: str) -> str:
  """The row pair a row belongs to: its name without the defense ('badnets_1pct_abl' -> 'badnets_1pct')."""
  return name.rsplit("_", 1)[0] if name.endswith(("_none", "_abl")) else name


def selected(config: ml_collections.ConfigDict) -> list[str]:
  """The rows config.table.only picks (row names, or pair names, e.g. 'sig', for both rows), in order."""
  order = list(config.table.order)
  missing = [n for n in order if n not in config.rows]
  if missing:
    raise ValueError(f"config.table.order names rows that config.rows lacks: {', '.join(missing)}")
  wanted = [w.strip() for w in config.table.only.split(",") if w.strip()]
  if not wanted:
    return order
  pairs = {n: pair(n) for n in order if n != "clean"}
  unknown = [w for w in wanted if w not in order and w not in pairs.values()]
  if unknown:
    raise ValueError(f"config.table.only={config.table.only!r}: unknown {', '.join(unknown)}; "
                     f"rows: {', '.join(order)}")
  return [n for n in order if n in wanted or pairs.get(n) in wanted]


def seeds(config: ml_collections.ConfigDict) -> list[int]:
  """The seeds config.table.seeds names ('0,1'), in order; [] where it is '' (the rows' own config.seed)."""
  text = str(config.table.get("seeds", "")).strip()
  if not text:
    return []
  allowed = "comma-separated distinct integers >= 0, e.g. '0,1', or '' for the rows' config.seed"
  try:
    out = [int(s) for s in text.split(",")]
  except ValueError:
    raise ValueError(f"config.table.seeds={text!r} is not a list of seeds; allowed: {allowed}") from None
  if any(s < 0 for s in out) or len(set(out)) != len(out):
    raise ValueError(f"config.table.seeds={text!r} repeats or has a negative seed; allowed: {allowed}")
  if any(i.partition("=")[0].strip() == "seed" for i in config.table.set.split(";")):
    raise ValueError(f"config.table.seeds={text!r} and config.table.set={config.table.set!r} both set the seed; "
                     "keep one")
  return out


def with_fields(row: ml_collections.ConfigDict, spec: str) -> ml_collections.ConfigDict:
  """A copy of `row` with 'group.field=value;...' set (values read as Python literals, else as strings)."""
  row = copy.deepcopy(row)
  for item in (i.strip() for i in spec.split(";") if i.strip()):
    key, _, text = item.partition("=")
    *parents, last = key.strip().split(".")
    node = row
    for p in parents:
      node = node[p]
    if last not in node:
      raise ValueError(f"config.table.set: {key.strip()!r} is not a field of the rows' configs")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    node[last] = value
  return row


def _write_plan(config: ml_collections.ConfigDict, workdir: str, seed_list: list[int] | None = None) -> None:
  """WORKDIR/table.json: every row of the table (so the report shows rows not run yet as missing), and the seeds
  where the sweep runs one table per seed."""
  rows = {n: {"attack": config.rows[n].attack.name, "defense": config.rows[n].defense.name,
              "poison_rate": config.rows[n].attack.poison_rate} for n in config.table.order}
  plan = {"variant": config.table.variant, "order": list(config.table.order), "rows": rows}
  if seed_list:
    plan["seeds"] = seed_list
  os.makedirs(workdir, exist_ok=True)
  workdir_files.write_json(os.path.join(workdir, "table.json"), plan)


def _stale(picture: str, runs: list[str]) -> bool:
  """Whether `picture` is missing or older than any of the runs' results.json."""
  return not os.path.exists(picture) or any(
      os.path.getmtime(os.path.join(r, "results.json")) > os.path.getmtime(picture) for r in runs)


def draw(workdir: str, names: list[str] | None = None) -> list[str]:
  """Draws the finished rows' missing or outdated pictures (curves, isolation, each attack's gallery), in each
  seed's table where the sweep has several."""
  plan = workdir_files.read_json(os.path.join(workdir, "table.json"))
  if "seeds" in plan:
    tables = [report.seed_dir(workdir, s) for s in plan["seeds"]]
    return [p for t in tables if os.path.exists(os.path.join(t, "table.json")) for p in draw(t, names)]
  plan = plan["rows"]
  done = {n for n in plan if os.path.exists(os.path.join(workdir, n, "results.json"))}
  written = []
  for name in [n for n in (names or plan) if n in done]:
    run = os.path.join(workdir, name)
    try:
      if _stale(os.path.join(run, "curves.png"), [run]):
        written += plots.write_run_plots(run)
      attack = plan[name]["attack"]
      both = [f"{pair(name)}_{d}" for d in ("none", "abl")]
      runs = [os.path.join(workdir, n) for n in both]
      out = os.path.join(runs[1], "gallery.png")
      if attack != "none" and set(both) <= done and _stale(out, runs):
        written.append(plots.gallery([("no defense", runs[0]), ("ABL", runs[1])], out))
    except Exception:  # A picture is not worth the remaining rows; the error is logged in full.
      logging.exception("pictures of table row %s failed", name)
  return [p for p in written if p]


def _same_test_set(row: ml_collections.ConfigDict, clean: str) -> bool:
  """Whether the finished run in `clean` was tested on the data `row` describes (its data fields and seed)."""
  if not os.path.exists(os.path.join(clean, "results.json")):
    return False
  theirs = workdir_files.read_json(os.path.join(clean, "config.json"))
  mine = workdir_files.config_json(row)
  return theirs.get("data") == mine["data"] and theirs.get("seed") == mine["seed"]


def run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False) -> dict[str, Any]:
  """Runs the selected rows one after another, then writes the report; returns {row: results or None}, or
  {seed: that} where config.table.seeds names several."""
  seed_list = seeds(config)
  if seed_list:
    return _run_seeds(config, workdir, seed_list, overwrite=overwrite)
  names = selected(config)
  rows = {n: with_fields(config.rows[n], config.table.set) for n in names}  # A bad field fails here, at once.
  if distributed.is_primary():  # Files once, by process 0 (docs/multihost.md); every process trains.
    _write_plan(config, workdir)
  results: dict[str, Any] = {}
  failed: dict[str, str] = {}
  clean = os.path.join(workdir, "clean")
  for i, name in enumerate(names):
    logging.info("table row %d/%d: %s", i + 1, len(names), name)
    row = rows[name]
    if row.attack.name != "none" and not row.attack.floor_model and _same_test_set(row, clean):
      row.attack.floor_model = clean  # The clean model's ASR under this row's trigger: its ASR's floor.
    try:
      results[name] = experiment.train_and_evaluate(rows[name], os.path.join(workdir, name), overwrite=overwrite)
    except Exception as e:  # One failing row should not cost the others; the report shows it as unfinished.
      logging.exception("table row %s failed", name)
      results[name], failed[name] = None, f"{type(e).__name__}: {e}"
      continue
    if config.table.plots and distributed.is_primary():
      draw(workdir, [name])
  if distributed.is_primary():
    print(report.write(workdir))
  if failed:
    raise RuntimeError("table rows failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
  return results


def _run_seeds(config: ml_collections.ConfigDict, workdir: str, seed_list: list[int], *,
               overwrite: bool) -> dict[int, Any]:
  """The table once per seed, in WORKDIR/s<seed>, then the report over the seeds."""
  selected(config)  # A bad row name fails here, before any seed runs.
  if distributed.is_primary():
    _write_plan(config, workdir, seed_list)
  results: dict[int, Any] = {}
  failed: list[str] = []
  for i, seed in enumerate(seed_list):
    logging.info("table seed %d/%d: %d", i + 1, len(seed_list), seed)
    one = copy.deepcopy(config)
    one.table.seeds = ""
    for name in one.rows:
      one.rows[name].seed = seed
    try:
      results[seed] = run(one, report.seed_dir(workdir, seed), overwrite=overwrite)
    except RuntimeError as e:  # Rows failed in this seed; the other seeds still run.
      results[seed] = None
      failed.append(f"seed {seed}: {e}")
  if distributed.is_primary():
    print(report.write(workdir))
  if failed:
    raise RuntimeError("; ".join(failed))
  return results
