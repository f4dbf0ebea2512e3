"""The report from run directories, the pictures, and the table sweep (skips finished rows)."""
import json
import os
import shutil

import numpy as np
import pytest

from abl_jax import abl, cost, experiment, plots, report, table, workdir
from configs import table as table_config
import smoke

PNG = b"\x89PNG\r\n\x1a\n"


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(obj if isinstance(obj, str) else json.dumps(obj))


def _fake_run(root, name, attack, defense, results=None, epochs=()):
  """A run directory with config.json, metrics.jsonl (per-epoch records) and, if finished, results.json."""
  run = os.path.join(root, name)
  _write(os.path.join(run, "config.json"), {"attack": {"name": attack}, "defense": {"name": defense},
                                            "train": {"epochs": 8},
                                            "abl": {"isolation_epochs": 2, "finetune_epochs": 4, "unlearning_epochs": 20}})
  _write(os.path.join(run, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in epochs))
  if results is not None:
    _write(os.path.join(run, "results.json"), results)
  return run


CLEAN = {"train_accuracy": 0.99, "clean_accuracy": 0.95, "attack_success_rate": None, "train_loss": 0.031,
         "clean_test_loss": 0.2, "poisoned_test_loss": None, "isolation": None,
         "wall_time": {"poison": 1.0, "train": 239.0, "evaluate": 60.0},
         "versions": {"python": "3.11.7", "jax": "0.10.2", "devices": ["TFRT_CPU_0"],
                      "xla_flags": "--xla_cpu_experimental_ynn_fusion_type="}}
SIG_ABL = {"train_accuracy": 0.96, "clean_accuracy": 0.89, "attack_success_rate": 0.05, "train_loss": 0.13,
           "clean_test_loss": 0.41, "poisoned_test_loss": 10.8, "target_class_accuracy": 0.52,
           "isolation": {"precision": 0.35, "recall": 0.7, "num_isolated": 100},
           "wall_time": {"isolation": 60.0, "finetune": 50.0, "unlearning": 10.0}}


def test_report_from_two_runs_gives_their_rows_and_numbers(tmp_path):
  _fake_run(tmp_path, "sig_abl", "sig", "abl", SIG_ABL)
  _fake_run(tmp_path, "clean", "none", "none", CLEAN)
  text = report.write(str(tmp_path))
  rows = json.loads((tmp_path / "report.json").read_text())["rows"]
  assert [r["name"] for r in rows] == ["clean", "sig_abl"]  # The clean model first.
  clean, sig = rows
  assert clean["label"] == "Model trained with clean data" and clean["status"] == "done"
  assert sig["label"] == "Model trained using ABL against SIG attack"
  assert sig["clean_accuracy"] == 0.89 and sig["isolation_precision"] == 0.35 and sig["wall_time_s"] == 120.0
  lines = text.splitlines()
  assert lines[2] == ("| Model trained with clean data | 99.0 | 95.0 | n/a | n/a | 0.031 | 0.2 | n/a |  | – | 5.0 min "
                      "| done |")
  assert lines[3] == ("| Model trained using ABL against SIG attack | 96.0 | 89.0 | 5.0 | 52.0 | 0.13 | 0.41 | 10.8 "
                      "| 0.35 / 0.70 | – | 2.0 min | done |")
  assert (tmp_path / "report.md").read_text() == text
  assert ("Measured with python 3.11.7, jax 0.10.2, devices TFRT_CPU_0, "
          "XLA_FLAGS '--xla_cpu_experimental_ynn_fusion_type='.") in lines


def test_suspected_labels_are_the_spectral_and_the_followed_judgements_outlier_labels(tmp_path):
  # The second gauge's verdict replaces the first's (here it clears label 4); spectral flags always count.
  summary = {"spectral_labels": [0], "outlier_labels": [4], "regauge_outlier_labels": []}
  assert workdir.suspected_labels(summary) == [0]
  assert workdir.suspected_labels({"spectral_labels": [], "outlier_labels": [4, 2]}) == [2, 4]
  assert workdir.suspected_labels({"spectral_labels": [], "outlier_labels": [], "split_labels": [8]}) == [8]
  assert workdir.suspected_labels({"precision": 1.0}) is None  # Neither test ran (the paper's ABL).
  # A results.json written before the field: the report reads the verdict from its isolation summary and marks
  # the attack's target; a run that names it carries it as written.
  run = _fake_run(tmp_path, "badnets_abl", "badnets", "abl",
                  {**SIG_ABL, "isolation": {**SIG_ABL["isolation"], **summary}})
  config = json.loads(open(os.path.join(run, "config.json")).read())
  _write(os.path.join(run, "config.json"), {**config, "attack": {"name": "badnets", "target_label": 0}})
  _fake_run(tmp_path, "blend_abl", "blend", "abl", {**SIG_ABL, "suspected_labels": [3, 4]})
  lines = report.markdown(report.collect(str(tmp_path))).splitlines()
  assert "| 0.35 / 0.70 | 0 (target) | 2.0 min | done |" in lines[2] and "| 3, 4 | 2.0 min |" in lines[3]
  _fake_run(tmp_path / "clean", "clean_abl", "none", "abl", {**SIG_ABL, "suspected_labels": []})
  assert "| none | 2.0 min |" in report.markdown(report.collect(str(tmp_path / "clean")))


def test_missing_and_unfinished_rows_are_reported_not_dropped(tmp_path):
  _fake_run(tmp_path, "clean", "none", "none", CLEAN)
  _fake_run(tmp_path, "badnets_none", "badnets", "none", epochs=[
      {"step": 25, "phase": "train", "epoch": e, "train/loss": 1.0} if e == 3 else
      {"step": 10 * e, "phase": "train", "epoch": e, "global_epoch": e, "epoch/loss": 1.0,
       "eval/clean_accuracy": 0.3} for e in (1, 2, 3)])
  _write(str(tmp_path / "table.json"), {"order": ["clean", "badnets_none", "badnets_abl"], "rows": {
      "clean": {"attack": "none", "defense": "none"}, "badnets_none": {"attack": "badnets", "defense": "none"},
      "badnets_abl": {"attack": "badnets", "defense": "abl"}}})
  rows = report.collect(str(tmp_path))
  assert [r["status"] for r in rows] == ["done", "unfinished", "missing"]
  assert rows[1]["detail"].startswith("unfinished: train epoch 2 done (2 of 8 epochs)")
  assert rows[2]["label"] == "Model trained using ABL against BadNets attack"
  lines = report.markdown(rows).splitlines()
  assert lines[3].startswith("| Model trained with BadNets attack | — | — |") and "unfinished: train epoch 2" in lines[3]
  assert lines[4].endswith(f"missing: no run in {tmp_path / 'badnets_abl'} |")


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == PNG and os.path.getsize(path) > 5000


def test_run_plots_are_written(tmp_path):
  epochs = [{"step": 10 * g, "phase": p, "epoch": e, "global_epoch": g, "eval/clean_accuracy": 0.1 * g,
             "eval/attack_success_rate": a} for p, e, g, a in [("isolation", 1, 1, 0.9), ("isolation", 2, 2, 1.0), ("finetune", 1, 3, 1.0),
                               ("unlearning", 1, 4, 0.5), ("unlearning", 2, 5, 0.0)]]
  run = _fake_run(tmp_path, "badnets_abl", "badnets", "abl", epochs=epochs)
  rng = np.random.default_rng(0)
  is_poisoned = np.arange(200) < 20
  scores = np.where(is_poisoned, rng.uniform(1e-5, 1e-3, 200), rng.uniform(0.1, 5.0, 200)).astype(np.float32)
  np.savez(os.path.join(run, "isolation.npz"), scores=scores, isolated=np.argsort(scores)[:4], is_poisoned=is_poisoned)
  written = plots.write_run_plots(run)
  assert [os.path.basename(p) for p in written] == ["curves.png", "isolation.png"]
  assert all(_is_png(p) for p in written)
  assert [r["global_epoch"] for r in plots.epoch_records(run)] == [1, 2, 3, 4, 5]


def test_judge_plot_marks_the_runs_splits(tmp_path, monkeypatch):
  run = _fake_run(tmp_path, "badnets_abl", "badnets", "abl")
  config = json.loads(open(os.path.join(run, "config.json")).read())
  config["abl"].update(disown_below=0.1, own_above=0.5)
  _write(os.path.join(run, "config.json"), config)
  pool = np.arange(10)
  np.savez(os.path.join(run, "isolation.npz"), pool=pool, is_poisoned=np.arange(50) < 3)
  np.savez(os.path.join(run, "returned.npz"), judge_loss=-np.log(np.linspace(0.01, 0.9, 10)))
  monkeypatch.setattr(plots, "_save", lambda fig, path: fig)
  labels = plots.plot_judge(run, "judge.png").axes[0].get_legend_handles_labels()[1]
  assert labels == ["clean pool examples (7)", "poisoned pool examples (3)",
                    "disown_below=0.1 (below: not this label)", "own_above=0.5 (at or above: keeps its label)"]


def test_rejected_plot_shows_each_labels_share_and_outlier_score(tmp_path, monkeypatch):
  run = _fake_run(tmp_path, "wanet_abl", "wanet", "abl")
  config = json.loads(open(os.path.join(run, "config.json")).read())
  config["abl"].update(disown_below=0.1, class_outlier_z=3.5)
  _write(os.path.join(run, "config.json"), config)
  # 3 labels x 10 examples, example 0 in the pool; outside it the gauge rejects 1, 2 and 8 examples of labels
  # 0, 1, 2 (label 2's: 5 poisoned).
  labels = np.repeat(np.arange(3), 10)
  own = np.full(30, 0.9)
  own[[1, 11, 12, *range(20, 28)]] = 0.05
  poisoned = np.isin(np.arange(30), range(20, 25))
  np.savez(os.path.join(run, "isolation.npz"), pool=np.array([0]), labels=labels, is_poisoned=poisoned)
  np.savez(os.path.join(run, "returned.npz"), outside_gauge_loss=-np.log(own))
  monkeypatch.setattr(plots, "_save", lambda fig, path: fig)
  ax = plots.plot_rejected(run, "rejected.png").axes[0]
  heights = [round(p.get_height(), 3) for p in ax.patches]
  assert heights == [round(1 / 9, 3), 0.2, 0.3, 0.0, 0.0, 0.5]  # Clean shares, then poisoned on top.
  scores = abl.outlier_scores(np.array([1 / 9, 0.2, 0.8]), np.array([9, 10, 10]))
  assert [t.get_text() for t in ax.texts] == [f"{v:.1f}" for v in scores]
  assert ax.texts[2].get_color() == "tab:red" and ax.texts[1].get_color() == "black"
  # A run with levels saved each level's scores: one panel per level, red where above the cutoff.
  config["abl"]["class_outlier_below"] = [0.1, 0.02]
  _write(os.path.join(run, "config.json"), config)
  np.savez(os.path.join(run, "returned.npz"), outside_gauge_loss=-np.log(own),
           outlier_scores=np.array([[0.5, 3.0, 1.0], [-0.2, 2.0, 4.0]]))
  fig = plots.plot_rejected(run, "rejected.png")
  assert [ax.get_title() for ax in fig.axes] == ["outside the pool, the gauge gives the label < 0.1",
                                                 "outside the pool, the gauge gives the label < 0.02"]
  strict = fig.axes[1]
  assert [round(p.get_height(), 3) for p in strict.patches] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # None below 0.02.
  assert [t.get_text() for t in strict.texts] == ["-0.2", "2.0", "4.0"]
  assert strict.texts[2].get_color() == "tab:red" and fig.axes[0].texts[2].get_color() == "black"
  # class_outlier_ratio: the first panel names the top share's ratio to the next; label 2's 8 of 10 against 2 of
  # 10 is 4x, but too few examples to be improbable at z 3.5, so it stays black.
  config["abl"]["class_outlier_ratio"] = 1.6
  _write(os.path.join(run, "config.json"), config)
  fig = plots.plot_rejected(run, "rejected.png")
  assert fig.axes[0].get_title().endswith("the top share is 4.00x the next (flagged at 1.6x, if improbable)")
  assert fig.axes[0].texts[2].get_color() == "black" and fig.axes[1].get_title().endswith("< 0.02")


def test_rows_are_selected_by_name_or_attack_and_fields_set_in_every_row():
  config = table_config.get_config("smoke")
  config.table.only = "clean,sig,badnets_abl"
  assert table.selected(config) == ["clean", "badnets_abl", "sig_none", "sig_abl"]
  row = table.with_fields(config.rows.sig_abl, "abl.unlearning_mode=ascent; abl.unlearning_lr=0.5")
  assert (row.abl.unlearning_mode, row.abl.unlearning_lr, config.rows.sig_abl.abl.unlearning_lr) == ("ascent", 0.5, 0.02)
  with pytest.raises(ValueError, match="abl.nope"):
    table.with_fields(row, "abl.nope=1")
  config.table.only = "clean,nope"
  with pytest.raises(ValueError, match="nope"):
    table.selected(config)


def test_sweep_runs_new_rows_skips_finished_ones_and_draws(runs, tmp_path, monkeypatch):
  root, _, _ = runs  # BadNets smoke runs without defense and with ABL: the table's badnets rows, finished.
  workdir = tmp_path / "table"
  for name, src in (("badnets_none", "none"), ("badnets_abl", "abl")):
    shutil.copytree(root / src, workdir / name)
  config = table_config.get_config("smoke")
  config.table.only = "clean,badnets"
  clean = config.rows.clean
  clean.train.epochs = 1
  for key, value in smoke.PREVIOUS_DEFAULT.items():  # The fixture's ABL run is the previous default's.
    group, name = key.split("__")
    config.rows.badnets_abl[group][name] = value
  prepared, floors = [], []
  real_prepare, real_run = experiment.prepare, experiment.train_and_evaluate
  monkeypatch.setattr(experiment, "prepare", lambda c: prepared.append(c.attack.name) or real_prepare(c))
  monkeypatch.setattr(experiment, "train_and_evaluate",
                      lambda c, w, **k: floors.append(c.attack.floor_model) or real_run(c, w, **k))
  results = table.run(config, str(workdir))
  # Only the clean row trained; the finished badnets rows were not retrained, only given the clean model's ASR
  # under their trigger.
  assert prepared == ["none", "badnets", "badnets"]
  assert floors == ["", str(workdir / "clean"), str(workdir / "clean")]  # The attack rows' floor: the clean model.
  for name in ("badnets_none", "badnets_abl"):
    saved = json.loads((workdir / name / "results.json").read_text())
    assert saved["floor_model"] == str(workdir / "clean") and 0 <= saved["floor_asr"] <= 1
    assert saved["clean_accuracy"] == results[name]["clean_accuracy"] and "floor_asr" in results[name]
  assert set(results) == {"clean", "badnets_none", "badnets_abl"}
  for path in ("clean/curves.png", "badnets_none/curves.png", "badnets_abl/curves.png",
               "badnets_abl/isolation.png", "badnets_abl/gallery.png"):
    assert _is_png(workdir / path), path
  rows = {r["name"]: r for r in json.loads((workdir / "report.json").read_text())["rows"]}
  assert len(rows) == len(config.table.order) and rows["sig_abl"]["status"] == "missing"
  assert rows["badnets_abl"]["clean_accuracy"] == results["badnets_abl"]["clean_accuracy"]
  table.run(config, str(workdir))
  assert prepared == ["none", "badnets", "badnets"]  # A second sweep retrains and re-evaluates nothing.


def test_a_clean_row_on_other_data_is_no_rows_floor(tmp_path):
  row = table_config.get_config("smoke").rows.badnets_abl
  clean = tmp_path / "clean"
  assert not table._same_test_set(row, str(clean))  # Not run yet.
  _write(str(clean / "results.json"), CLEAN)
  _write(str(clean / "config.json"), {"data": workdir.config_json(row)["data"], "seed": row.seed})
  assert table._same_test_set(row, str(clean))
  row.data.synthetic_test_size = 64
  assert not table._same_test_set(row, str(clean))


def test_seed_summary_gives_mean_range_and_the_change_against_no_defense(runs, tmp_path, capsys):
  root, none, abl = runs
  for seed in ("s0", "s1"):
    os.makedirs(tmp_path / seed)
    os.symlink(root / "none", tmp_path / seed / "badnets_none")
    os.symlink(root / "abl", tmp_path / seed / "badnets_abl")
  report.main(["--seeds", str(tmp_path / "s0"), str(tmp_path / "s1")])
  lines = capsys.readouterr().out.splitlines()
  defended = next(l for l in lines if l.startswith("| Model trained using ABL against BadNets attack"))
  cells = [c.strip() for c in defended.split("|")[1:-1]]
  same = lambda text: f"{text} ({text} to {text})"  # Both seeds are the same runs: min = mean = max.
  assert cells[1] == same(f"{100 * abl['clean_accuracy']:.1f}")
  assert cells[3] == same(f"{100 * abl['untriggered_target_rate']:.1f}")
  assert cells[5] == same(f"{100 * (abl['clean_accuracy'] - none['clean_accuracy']):+.1f}")
  trained = lambda r: sum(v for k, v in r["wall_time"].items() if k not in ("poison", "evaluate"))
  assert cells[7] == same(f"{trained(abl) / trained(none):.1f}")
  undefended = next(l for l in lines if l.startswith("| Model trained with BadNets attack"))
  assert undefended.split("|")[6].strip() == "–"
  assert cells[8] == same(f"{cost.ratio(str(root / 'abl'), str(root / 'none')):.2f}")  # Work, counted.
  assert cells[9] == "– / –"  # Each seed's verdict; the smoke run's defense (no gauge, no spectral test) has none.
  assert report.seeds_markdown([str(tmp_path / "s0")]).count("\n| Model trained") == 2


def test_the_clean_models_asr_is_a_column_where_a_row_measured_it(tmp_path):
  _fake_run(tmp_path, "clean", "none", "none", CLEAN)
  _fake_run(tmp_path, "sig_abl", "sig", "abl", SIG_ABL)
  assert "Clean model's ASR" not in report.write(str(tmp_path))
  _fake_run(tmp_path, "sig_abl", "sig", "abl", {**SIG_ABL, "floor_asr": 0.021})
  lines = report.write(str(tmp_path)).splitlines()
  assert lines[0].startswith("| Model | Train acc. (%) | Test CA (%) | Test ASR (%) | Clean model's ASR (%) |")
  assert lines[2].startswith("| Model trained with clean data | 99.0 | 95.0 | n/a | n/a |")
  assert lines[3].startswith("| Model trained using ABL against SIG attack | 96.0 | 89.0 | 5.0 | 2.1 | 52.0 |")
  assert "floor_asr" in json.loads((tmp_path / "report.json").read_text())["columns"]


def test_a_pair_trained_on_different_data_is_named(tmp_path):
  _fake_run(tmp_path, "sig_none", "sig", "none", {**CLEAN, "data": {"train": "aaaa", "test": "cccc"}})
  _fake_run(tmp_path, "sig_abl", "sig", "abl", {**SIG_ABL, "data": {"train": "bbbb", "test": "cccc"}})
  _fake_run(tmp_path, "clean", "none", "none", {**CLEAN, "data": {"train": "dddd", "test": "cccc"}})
  warnings = [l for l in report.write(str(tmp_path)).splitlines() if l.startswith("**Other data**")]
  assert len(warnings) == 1 and warnings[0].startswith("**Other data**: sig_abl (")  # Not against clean.
  assert len([l for l in report.seeds_markdown([str(tmp_path)]).splitlines() if l.startswith("**Other data**")]) == 1
  _fake_run(tmp_path, "sig_abl", "sig", "abl", {**SIG_ABL, "data": {"train": "aaaa", "test": "cccc"}})
  assert "Other data" not in report.write(str(tmp_path))


def test_runs_without_a_plan_are_ordered_clean_first_and_each_pair_together(tmp_path):
  for name, attack, defense in [("sig_abl", "sig", "abl"), ("badnets_1pct_abl", "badnets", "abl"),
                                ("badnets_none", "badnets", "none"), ("clean", "none", "none"),
                                ("badnets_1pct_none", "badnets", "none"), ("badnets_abl", "badnets", "abl")]:
    _fake_run(tmp_path, name, attack, defense)
  assert [r["name"] for r in report.collect(str(tmp_path))] == [
      "clean", "badnets_none", "badnets_abl", "badnets_1pct_none", "badnets_1pct_abl", "sig_abl"]


def test_table_seeds_are_read_and_bad_ones_refused_naming_the_field():
  config = table_config.get_config("smoke")
  assert table.seeds(config) == []
  config.table.seeds = " 3,0 "
  assert table.seeds(config) == [3, 0]
  for bad in ("0,x", "1,1", "-1", "0,"):
    config.table.seeds = bad
    with pytest.raises(ValueError, match=r"config\.table\.seeds=.*allowed: comma-separated"):
      table.seeds(config)
  config.table.seeds, config.table.set = "0,1", "abl.gauge_epochs=2; seed=4"
  with pytest.raises(ValueError, match=r"config\.table\.seeds='0,1' and config\.table\.set=.*keep one"):
    table.seeds(config)


def test_a_sweep_over_seeds_runs_each_seeds_table_and_reports_their_mean(tmp_path, monkeypatch):
  ca = {("clean", 0): 0.60, ("clean", 1): 0.64, ("sig_none", 0): 0.62, ("sig_none", 1): 0.66,
        ("sig_abl", 0): 0.61, ("sig_abl", 1): 0.63}
  calls = []

  def fake_run(c, run_dir, **kwargs):  # Writes what a finished run leaves, with CA by row and seed.
    name = os.path.basename(run_dir)
    calls.append((name, c.seed, c.attack.floor_model, run_dir))
    if (name, c.seed) == ("sig_abl", 1) and [x[:2] for x in calls].count((name, 1)) == 1:
      raise RuntimeError("no space left")  # The first try of one row fails; the sweep goes on.
    _write(os.path.join(run_dir, "config.json"), workdir.config_json(c))
    results = {**(SIG_ABL if c.defense.name == "abl" else CLEAN), "clean_accuracy": ca[name, c.seed],
               "untriggered_target_rate": 0.03, "target_class_accuracy": 0.5 + c.seed / 10}
    _write(os.path.join(run_dir, "results.json"), results)
    return results

  monkeypatch.setattr(experiment, "train_and_evaluate", fake_run)
  config = table_config.get_config("smoke")
  config.table.only, config.table.seeds, config.table.plots = "clean,sig", "0,1", False
  root = tmp_path / "table"
  with pytest.raises(RuntimeError, match="seed 1: table rows failed: sig_abl: RuntimeError: no space left"):
    table.run(config, str(root))
  assert [(n, s, f) for n, s, f, _ in calls] == [
      ("clean", 0, ""), ("sig_none", 0, str(root / "s0" / "clean")), ("sig_abl", 0, str(root / "s0" / "clean")),
      ("clean", 1, ""), ("sig_none", 1, str(root / "s1" / "clean")), ("sig_abl", 1, str(root / "s1" / "clean"))]
  assert all(d == str(root / f"s{s}" / n) for n, s, _, d in calls)
  text = (root / "report.md").read_text()
  assert "Model trained using ABL against SIG attack" not in text  # Finished in one seed only: not in the mean,
  assert f"- sig_abl: s1: missing: no run in {root / 's1' / 'sig_abl'}" in text  # and named with why,
  assert "- not finished in any seed: badnets_none, badnets_abl, blend_none" in text  # the rows not selected too.
  assert "| Model trained with SIG attack | 64.0 (62.0 to 66.0) |" in text
  assert "[s0](s0/report.md), [s1](s1/report.md)" in text and (root / "s1" / "report.md").exists()
  table.run(config, str(root))  # Every row again (experiment itself skips a finished run); the failed one finishes.
  assert [c[:2] for c in calls[6:]] == [c[:2] for c in calls[:6]]
  summary = json.loads((root / "report.json").read_text())
  assert summary["seeds"] == [0, 1] and not [l for l in summary["left_out"] if "sig" in l]
  abl_row = next(r for r in summary["rows"] if r["name"] == "sig_abl")
  assert abl_row["clean_accuracy"] == [0.61, 0.63]
  assert [round(x, 4) for x in abl_row["clean_accuracy_change"]] == [-0.01, -0.03]
  assert [round(x, 4) for x in abl_row["target_class_accuracy_change"]] == [0.0, 0.0]
  assert "| Model trained using ABL against SIG attack | 62.0 (61.0 to 63.0) |" in report.write(str(root))


def test_candidates_plot_shows_each_labels_trigger_and_tail(tmp_path, monkeypatch):
  run = _fake_run(tmp_path, "sig_abl", "sig", "abl")
  deltas = np.zeros((3, 4, 4, 3), np.float32)
  deltas[1, :, 2] = 40.0  # Label 1's candidate brightens a column; label 2's darkens a pixel by the same amount.
  deltas[2, 0, 0] = -40.0
  labels = np.repeat(np.arange(3), 10)
  tail = np.isin(np.arange(30), [3, 11, 12, 13])
  np.savez(os.path.join(run, "isolation.npz"), labels=labels, candidate_triggers=deltas, candidate_tail=tail,
           is_poisoned=np.isin(np.arange(30), [11, 12, 14]))
  monkeypatch.setattr(plots, "_save", lambda fig, path: fig)
  fig = plots.plot_candidates(run, "candidates.png")
  axes = fig.axes[:3]
  assert [ax.get_title().split("\n")[0] for ax in axes] == ["label 0: tail 1 (0 poisoned)",
                                                            "label 1: tail 3 (2 poisoned)",
                                                            "label 2: tail 0 (0 poisoned)"]
  assert axes[1].title.get_color() == "tab:red" and axes[0].title.get_color() == "black"
  shown = axes[1].get_images()[0].get_array()
  np.testing.assert_allclose(shown[:, 2], 1.0)
  np.testing.assert_allclose(shown[:, 0], 0.5)
  np.testing.assert_allclose(axes[2].get_images()[0].get_array()[0, 0], 0.0)
  os.remove(os.path.join(run, "isolation.npz"))
  assert plots.plot_candidates(run, "candidates.png") is None
