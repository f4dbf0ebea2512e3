"""End to end on synthetic data: no defense vs ABL, resume, eval mode, workdir safety, config flags."""
import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from abl_jax import experiment, metrics, workdir
from configs import abl_badnets
from smoke import config as smoke

METRICS = ("clean_accuracy", "attack_success_rate", "clean_test_loss", "poisoned_test_loss", "train_accuracy",
           "train_loss")


def test_no_defense_learns_the_backdoor_and_abl_removes_it(runs):
  _, none, abl = runs
  # Synthetic smoke data: chance is 0.1; the backdoor is learned long before the classes are.
  assert none["clean_accuracy"] > 0.15 and none["attack_success_rate"] > 0.9
  assert abl["clean_accuracy"] > 0.15
  assert abl["attack_success_rate"] < 0.2
  assert abl["isolation"]["precision"] > 0.9  # The lowest-loss examples are the poisoned ones.


def test_results_file_has_the_promised_fields(runs):
  root, _, abl = runs
  with open(root / "abl" / "results.json") as f:
    saved = json.load(f)
  for field in (*METRICS, "attack", "defense", "isolation", "config", "wall_time"):
    assert field in saved, field
  assert saved["attack"] == "badnets" and saved["defense"] == "abl"
  # The isolation scores' pass counts as the defense's time ("scoring"), apart from its training phases.
  assert set(saved["wall_time"]) >= {"poison", "isolation", "scoring", "finetune", "unlearning", "evaluate"}
  assert saved["wall_time"]["scoring"] > 0
  assert saved["config"]["abl"]["isolation_ratio"] == 0.05
  assert 0.0 <= saved["attack_success_rate"] <= 1.0
  records = metrics.read(str(root / "abl"))
  epochs = metrics.series(records, "epoch/loss")
  assert [r["phase"] for r in epochs] == ["isolation"] * 2 + ["finetune"] * 2 + ["unlearning"] * 3
  assert [r["global_epoch"] for r in epochs] == list(range(1, 8))
  assert [r["step"] for r in epochs] == [16, 32, 48, 64, 66, 68, 70]  # 1024 / 64 steps, 973 / 64, 51 / 32.
  assert [r["epoch"] for r in metrics.series(records, "eval/clean_accuracy") if r["phase"] == "unlearning"] == [0, 1, 2, 3]
  assert metrics.series(records, "isolation/precision")[0]["isolation/precision"] == saved["isolation"]["precision"]
  assert os.path.exists(root / "abl" / "isolation.npz")
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(root / "abl" / "tensorboard"))


def test_eval_mode_reproduces_results(runs):
  root, _, abl = runs
  evaluated = experiment.evaluate_checkpoint(smoke(), str(root / "abl"))
  for field in METRICS:
    assert evaluated[field] == pytest.approx(abl[field], abs=1e-6), field
  with open(root / "abl" / "eval.json") as f:
    assert set(json.load(f)) >= set(METRICS) | {"isolation", "checkpoint"}


def test_the_floor_model_is_evaluated_under_this_runs_trigger(runs, tmp_path):
  root, none, _ = runs
  # The no-defense run as the floor of the ABL run: under the same trigger and test set its numbers come back.
  out = experiment.evaluate_checkpoint(smoke(attack__floor_model=str(root / "none")), str(root / "abl"))
  assert out["floor_model"] == str(root / "none")
  assert out["floor_asr"] == none["attack_success_rate"] and out["floor_asr"] > 0.5
  assert out["floor_untriggered_target_rate"] == none["untriggered_target_rate"]
  assert "floor_asr" not in none  # Not measured unless asked for.
  with pytest.raises(ValueError, match=r"config\.attack\.floor_model='nowhere' holds no finished run"):
    experiment.train_and_evaluate(smoke(attack__floor_model="nowhere"), str(tmp_path / "a"))
  other = experiment.train_and_evaluate(smoke(defense__name="none", train__epochs=1, data__synthetic_test_size=128),
                                        str(tmp_path / "other"))
  assert other["num_test"] == 128
  with pytest.raises(ValueError, match=r"config\.attack\.floor_model=.* was tested on another test set"):
    experiment.evaluate_checkpoint(smoke(attack__floor_model=str(tmp_path / "other")), str(root / "abl"))


def test_resume_equals_uninterrupted(runs, tmp_path):
  _, _, abl = runs
  assert experiment.train_and_evaluate(smoke(), str(tmp_path), max_epochs=3) is None  # Stops inside fine-tuning.
  assert not os.path.exists(tmp_path / "results.json")
  resumed = experiment.train_and_evaluate(smoke(), str(tmp_path))
  for field in METRICS:
    assert resumed[field] == pytest.approx(abl[field], abs=1e-5), field
  assert resumed["isolation"] == abl["isolation"] | {"seconds": resumed["isolation"]["seconds"]}


def test_finished_run_is_not_retrained_or_overwritten(runs):
  root, none, _ = runs
  before = os.path.getmtime(root / "none" / "results.json")
  assert experiment.train_and_evaluate(smoke(defense__name="none"), str(root / "none")) == none
  assert os.path.getmtime(root / "none" / "results.json") == before


def test_workdir_of_another_config_is_refused(runs):
  root, _, _ = runs
  with pytest.raises(experiment.WorkdirError, match=r"config\.abl\.gamma: 0\.5 -> 0\.3.*--overwrite"):
    experiment.train_and_evaluate(smoke(abl__gamma=0.3), str(root / "abl"))
  with pytest.raises(experiment.WorkdirError, match="different config"):
    experiment.evaluate_checkpoint(smoke(abl__gamma=0.3), str(root / "abl"))


def test_no_defense_run_ignores_abl_fields_and_every_run_the_eval_batch_size(runs):
  root, none, _ = runs
  assert experiment.train_and_evaluate(smoke(defense__name="none", abl__gamma=0.3), str(root / "none")) == none
  # The evaluation batch size changes no output (test_train), for any run.
  assert experiment.train_and_evaluate(smoke(defense__name="none", train__eval_batch_size=64),
                                       str(root / "none")) == none
  experiment.check_same_config(smoke(train__eval_batch_size=64), str(root / "abl"))
  with pytest.raises(experiment.WorkdirError, match=r"config\.attack\.poison_rate"):
    experiment.train_and_evaluate(smoke(defense__name="none", attack__poison_rate=0.2), str(root / "none"))


@pytest.mark.parametrize("override, message", [
    (dict(attack__name="trojan"), r"config\.attack\.name='trojan' is unknown; allowed: none, badnets, blend, sig"),
    (dict(model__name="vgg"), r"config\.model\.name='vgg' is unknown; allowed: resnet18, wrn16_1, small_cnn, airbench"),
    (dict(defense__name="nad"), r"config\.defense\.name='nad' is unknown; allowed: none, abl"),
    (dict(data__source="web"), r"config\.data\.source='web' is unknown; allowed: tfds, folder, synthetic"),
    (dict(attack__poison_rate=1.5), r"config\.attack\.poison_rate=1\.5 must be in \(0, 1\]"),
    (dict(attack__poison_rate=0.0), r"config\.attack\.poison_rate=0\.0 must be in \(0, 1\]"),
    (dict(abl__isolation_ratio=0.0005), r"config\.abl\.isolation_ratio=0\.0005 isolates 0 of 1024"),
    (dict(attack__target_label=10), r"config\.attack\.target_label=10"),
    (dict(data__source="folder", data__path="/nonexistent"), r"config\.data\.path='/nonexistent' does not exist"),
])
def test_bad_input_stops_early_naming_the_field(tmp_path, override, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    experiment.train_and_evaluate(smoke(**override), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_config_flags_override_fields_and_pick_variants():
  argv = ["prog", "--config=configs/abl_sig.py:smoke", "--config.attack.delta=20",
          "--config.abl.isolation_ratio=0.02", "--config.train.batch_size=256"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  config = values.config
  assert (config.attack.name, config.data.source, config.model.name) == ("sig", "synthetic", "small_cnn")
  assert (config.attack.delta, config.abl.isolation_ratio, config.train.batch_size) == (20.0, 0.02, 256)


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match=r"config variant 'gpu' is unknown; allowed: '', 'cpu', 'fast', 'smoke'"):
    abl_badnets.get_config("gpu")


def test_clean_model_baseline_has_no_attack_metrics(tmp_path):
  clean = experiment.train_and_evaluate(smoke(attack__name="none", defense__name="none", train__epochs=1),
                                        str(tmp_path))
  assert clean["num_poisoned"] == 0 and clean["attack_success_rate"] is None
  assert clean["poisoned_test_loss"] is None and clean["train_accuracy_poisoned_part"] is None


def test_run_from_before_a_field_existed_is_the_same_experiment_at_its_old_value(runs, tmp_path):
  root, _, _ = runs
  saved = json.load(open(root / "abl" / "config.json"))
  del saved["abl"]["gauge_epochs"], saved["train"]["label_smoothing"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir.check_same_config(smoke(), str(tmp_path))  # Absent = the value that does what the old run did.
  with pytest.raises(experiment.WorkdirError, match=r"config\.abl\.gauge_epochs: None -> 2"):
    workdir.check_same_config(smoke(abl__gauge_epochs=2), str(tmp_path))
