"""Metrics: clean accuracy (CA), attack success rate (ASR), losses, isolation precision/recall.

Conventions (also in the README):
  CA   share of the whole clean test set classified correctly.
  ASR  share of the non-target-class test images, trigger applied, classified as the target class.
  untriggered target rate  the same share without the trigger: what ASR would be if the trigger did nothing.
  The ground-truth poison mask is read here, for metrics only; the defense never receives it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from abl_jax.data import Dataset
from abl_jax.train import Predict


def class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
  """Accuracy on the test images of each class (None for a class without images)."""
  pred, labels = np.asarray(pred), np.asarray(labels)
  return [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else None for c in range(num_classes)]


def test_metrics(predict: Predict, test: Dataset, poisoned_test: Dataset | None,
                 per_class: bool = False) -> dict[str, Any]:
  """CA and clean test loss; ASR and poisoned test loss when there is a trigger; `per_class`: each class's CA."""
  ce, pred = predict(test.images, test.labels)
  out: dict[str, Any] = {
      "clean_accuracy": float(np.mean(pred == test.labels)),
      "clean_test_loss": float(np.mean(ce)),
      "attack_success_rate": None,
      "poisoned_test_loss": None,
      "untriggered_target_rate": None,
  }
  if per_class:
    out["class_accuracy"] = class_accuracy(pred, test.labels, test.num_classes)
  if poisoned_test is not None and len(poisoned_test):
    target = int(poisoned_test.labels[0])  # Every attack here is all-to-one.
    out["untriggered_target_rate"] = float(np.mean(pred[test.labels != target] == target))
    ce, pred = predict(poisoned_test.images, poisoned_test.labels)
    out["attack_success_rate"] = float(np.mean(pred == poisoned_test.labels))
    out["poisoned_test_loss"] = float(np.mean(ce))
  return out


def train_metrics(predict: Predict, train: Dataset, is_poisoned: np.ndarray) -> dict[str, float | None]:
  """Accuracy and loss on the (poisoned) training set, overall and on its clean / poisoned parts."""
  ce, pred = predict(train.images, train.labels)
  correct = pred == train.labels

  def part(values, mask):
    return float(np.mean(values[mask])) if mask.any() else None

  return {
      "train_accuracy": float(np.mean(correct)),
      "train_loss": float(np.mean(ce)),
      "train_accuracy_clean_part": part(correct, ~is_poisoned),
      "train_loss_clean_part": part(ce, ~is_poisoned),
      "train_accuracy_poisoned_part": part(correct, is_poisoned),
      "train_loss_poisoned_part": part(ce, is_poisoned),
  }


def cross_trigger_metrics(predict: Predict, cross_test: Dataset, is_cross: np.ndarray | None) -> dict[str, float | int]:
  """Share of cross-triggered test images classified as their true label.

  The cross trigger is the attack's trigger that must not flip a label: input_aware, another image's trigger;
  wanet, the noise-mode warp (the reference code's "cross" examples), so for WaNet this is noise-mode accuracy.
  """
  _, pred = predict(cross_test.images, cross_test.labels)
  return {"cross_trigger_accuracy": float(np.mean(pred == cross_test.labels)),
          "num_cross_train": 0 if is_cross is None else int(np.sum(is_cross))}


def isolation_metrics(isolated: np.ndarray, is_poisoned: np.ndarray) -> dict[str, float | int | None]:
  """Precision and recall of the isolated set against the ground-truth poison mask."""
  hits = int(np.sum(is_poisoned[isolated]))
  total = int(np.sum(is_poisoned))
  return {
      "num_isolated": int(len(isolated)),
      "num_poisoned_isolated": hits,
      "num_poisoned": total,
      "precision": hits / len(isolated) if len(isolated) else None,
      "recall": hits / total if total else None,
  }
