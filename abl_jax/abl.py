"""Anti-Backdoor Learning: the isolation losses, per-example isolation, and the unlearning loss.

    loss = lga_loss(ce, gamma=0.5)         # ce: per-example cross-entropy of the whole global batch
    picked = isolate(scores, ratio=0.01)   # lowest-loss 1%: suspected backdoor examples

Every function here sees losses, images and labels only, never the ground-truth poison mask.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from abl_jax import registry


# Every loss maps the per-example cross-entropy [B] of the whole batch to a scalar.
LossFn = Callable[[jax.Array], jax.Array]


def cross_entropy_loss(ce: jax.Array) -> jax.Array:
  """Ordinary training: the batch-mean cross-entropy."""
  return jnp.mean(ce)


@dataclasses.dataclass(frozen=True)
class SmallLoss:
  """The mean cross-entropy of the batch but its `drop` share with the highest, of which at most `label_cap` of
  any label's examples (of equal losses, the later one goes first): a loss the train step calls with the batch's
  (hard) labels too. The cap keeps a class the model has not learned yet from being left out altogether."""
  drop: float
  label_cap: float = 0.5

  def __call__(self, ce: jax.Array, labels: jax.Array) -> jax.Array:
    fixed = jax.lax.stop_gradient(ce)
    order = jnp.arange(ce.shape[0])
    tied_later = (fixed[None, :] == fixed[:, None]) & (order[None, :] > order[:, None])
    higher = (fixed[None, :] > fixed[:, None]) | tied_later  # [i, j]: j ranks above i.
    same = labels[:, None] == labels[None, :]
    top = jnp.sum(higher, axis=1) < math.floor(self.drop * ce.shape[0])  # Among the batch's highest.
    label_top = jnp.sum(same & higher, axis=1) < jnp.floor(self.label_cap * jnp.sum(same, axis=1))
    kept = 1.0 - (top & label_top).astype(ce.dtype)
    return jnp.sum(ce * kept) / jnp.maximum(jnp.sum(kept), 1.0)


def lga_loss(ce: jax.Array, gamma: float) -> jax.Array:
  """Local gradient ascent: sign(CE - gamma) * CE on the batch-mean cross-entropy."""
  sign = jnp.sign(jax.lax.stop_gradient(jnp.mean(ce)) - gamma)
  return sign * jnp.mean(ce)


def flooding_loss(ce: jax.Array, gamma: float) -> jax.Array:
  """Flooding: |CE - gamma| + gamma on the batch-mean cross-entropy (same gradient as LGA)."""
  sign = jnp.sign(jax.lax.stop_gradient(jnp.mean(ce)) - gamma)
  return sign * (jnp.mean(ce) - gamma) + gamma


def neg_ce_loss(ce: jax.Array) -> jax.Array:
  """Gradient ascent on the isolated examples (the paper's unlearning): minimise -CE."""
  return -jnp.mean(ce)


def complement_loss(ce: jax.Array) -> jax.Array:
  """Unlearning by the complement: minimise -log(1 - p(label)), i.e. push p(label) to 0 and stop there."""
  # -CE's gradient vanishes on confidently learned examples (p -> 1) and grows without bound once they
  # are unlearned; this one is largest at p -> 1 and fades as p -> 0. 1 - p = -expm1(-ce), exactly.
  return -jnp.mean(jnp.log(-jnp.expm1(-jnp.maximum(ce, 1e-12))))


def _forget(loss: str) -> LossFn:
  if loss == "neg_ce":
    return neg_ce_loss
  if loss == "complement":
    return complement_loss
  registry.check_name("config.abl.unlearning_loss", loss)
  raise AssertionError(loss)


def joint_unlearning_loss(ce: jax.Array, num_isolated: int, weight: float,
                          forget: LossFn = neg_ce_loss) -> jax.Array:
  """Joint unlearning: `forget` the first `num_isolated` examples, descend CE (x weight) on the rest."""
  return forget(ce[:num_isolated]) + weight * jnp.mean(ce[num_isolated:])


@functools.lru_cache(maxsize=None)  # One function per setting: steps built for it are reused (train).
def unlearning_step_loss(mode: str, num_isolated: int, weight: float, loss: str = "neg_ce") -> LossFn:
  """The unlearning loss of `config.abl.unlearning_mode` and `unlearning_loss`.

  joint: each batch holds `num_isolated` isolated examples first, then the retained ones.
  """
  forget = _forget(loss)
  if mode == "ascent":
    return forget
  if mode == "joint":
    return lambda ce: joint_unlearning_loss(ce, num_isolated, weight, forget)
  registry.check_name("config.abl.unlearning_mode", mode)
  raise AssertionError(mode)


def stop_unlearning(isolated_predictions: np.ndarray, isolated_labels: np.ndarray, rule: str,
                    threshold: float, reference_accuracy: float | None = None) -> bool:
  """The defender's stopping rule: true once the model has unlearned the isolated examples' labels.

  isolated_accuracy: accuracy on the isolated examples' training labels <= threshold.
  retained_accuracy: that accuracy <= `reference_accuracy` + threshold, where the reference is the model's
  accuracy on retained (not suspicious) training examples of the same labels: the isolated examples are
  then fit no better than ordinary ones, i.e. nothing a backdoor taught is left to unlearn.
  It sees predictions, training labels and that reference only, nothing about the truth.
  """
  if rule == "none":
    return False
  accuracy = float(np.mean(np.asarray(isolated_predictions) == np.asarray(isolated_labels)))
  if rule == "isolated_accuracy":
    return bool(accuracy <= threshold)
  if rule == "retained_accuracy":
    if reference_accuracy is None:
      raise ValueError("config.abl.unlearning_stop='retained_accuracy' needs the retained examples' accuracy")
    return bool(accuracy <= reference_accuracy + threshold)
  registry.check_name("config.abl.unlearning_stop", rule)
  raise AssertionError(rule)


@functools.lru_cache(maxsize=None)  # One function per setting: steps built for it are reused (train).
def isolation_loss(name: str, gamma: float) -> LossFn:
  """The isolation-phase loss named by `config.abl.loss`."""
  if name == "lga":
    return lambda ce: lga_loss(ce, gamma)
  if name == "flooding":
    return lambda ce: flooding_loss(ce, gamma)
  registry.check_name("config.abl.loss", name)
  raise AssertionError(name)


def num_isolated(num_examples: int, ratio: float) -> int:
  """How many examples `ratio` isolates out of `num_examples` (the authors' int(n * ratio))."""
  registry.check_range("config.abl.isolation_ratio", ratio, 0.0, 1.0, low_open=True, high_open=True)
  k = int(num_examples * ratio)
  if k < 1:
    raise ValueError(f"config.abl.isolation_ratio={ratio} isolates 0 of {num_examples} training examples; "
                     f"use a ratio of at least {1.0 / num_examples:.2g}")
  return k


def isolate(scores: np.ndarray, ratio: float) -> np.ndarray:
  """Indices of the `ratio` lowest-scoring examples, lowest first (ties broken by index)."""
  k = num_isolated(len(scores), ratio)
  return np.argsort(np.asarray(scores), kind="stable")[:k].astype(np.int64)


def class_normalised(scores: np.ndarray, labels: np.ndarray, quantile: float = 0.5) -> np.ndarray:
  """log(score) minus the `quantile` of log(score) over the examples of the same training label.

  An isolation model stopped at a constant learning rate fits some classes far better than others (on the
  `cpu` SIG run, 63% of the trucks sit below the global 20% quantile, 0% of the dogs); measured against
  its own label's scores, a backdoor example (all of them carry the target label) still stands out as long
  as the reference quantile lies among the label's clean examples (BadNets at 10% makes half the target
  label poison, so its median is a poisoned example's score).
  """
  registry.check_range("config.abl.class_quantile", quantile, 0.0, 1.0, low_open=True)
  logs = np.log(np.maximum(np.asarray(scores, np.float64), 1e-12))
  labels = np.asarray(labels)
  out = np.empty_like(logs)
  for c in np.unique(labels):
    m = labels == c
    out[m] = logs[m] - np.quantile(logs[m], quantile)
  return out


def pool_ranking(scorings: list[np.ndarray], labels: np.ndarray, rule: str, quantile: float) -> np.ndarray:
  """What the suspicious pool is cut from (lowest = most suspect), from one or several scorings of every example.

  class_ratio measures each scoring within its training label (class_normalised) first; with several
  scorings an example ranks by its lowest rank in any of them (lowest_rank).
  """
  if rule == "class_ratio":
    scorings = [class_normalised(s, labels, quantile) for s in scorings]
  return np.asarray(scorings[0]) if len(scorings) == 1 else lowest_rank(scorings)


def suspicious_pool(ranking: np.ndarray, isolated: np.ndarray, rule: str, ratio: float) -> np.ndarray:
  """The examples fine-tuning leaves out (config.abl.pool_rule): always the isolated ones, sorted by index.

  isolated: the isolated set only (the paper's fine-tuning on the other 99%).
  ratio, class_ratio: the lowest `ratio` of `ranking` (pool_ranking: low isolation loss = suspect), plus the
  isolated ones.
  """
  if rule == "isolated":
    return np.sort(np.asarray(isolated, np.int64))
  if rule in ("ratio", "class_ratio"):
    registry.check_range("config.abl.pool_ratio", ratio, 0.0, 1.0, high_open=True)
    k = int(len(ranking) * ratio)
    low = np.argsort(np.asarray(ranking), kind="stable")[:k]
    return np.union1d(low, isolated).astype(np.int64)
  registry.check_name("config.abl.pool_rule", rule)
  raise AssertionError(rule)


def agreeing(pool: np.ndarray, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The pool examples whose prediction equals their training label (config.abl.return_rule='agree').

  `predictions` and `labels` are those of the pool's examples, in its order. A model fine-tuned without the
  pool, which never learned a trigger, mostly disagrees with a dirty-label backdoor example's label (the
  label is the trigger's, not the image's); on SIG's clean-label poison the signal itself moves most
  predictions away from the target (docs/defense.md).
  """
  pool = np.asarray(pool, np.int64)
  return pool[np.asarray(predictions) == np.asarray(labels)]


def largest_label_share(picked: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, int]:
  """The largest share of one training label's examples that `picked` holds, and that label."""
  share = np.bincount(labels[picked], minlength=num_classes) / np.maximum(np.bincount(labels, minlength=num_classes), 1)
  return float(np.max(share)), int(np.argmax(share))


def contradicts(gauge_loss: np.ndarray, gauge_prediction: np.ndarray, labels: np.ndarray,
                isolation_loss: np.ndarray, factor: float) -> np.ndarray:
  """Where a gauge predicts another class and gives the label at most 1/factor of the isolation model's
  probability for it (config.abl.contradict_factor); all arrays cover the same examples."""
  return (np.asarray(gauge_prediction) != np.asarray(labels)) & (
      np.asarray(gauge_loss) - np.asarray(isolation_loss) >= np.log(factor))


def outlier_scores(shares: np.ndarray, counts: np.ndarray, sampling: bool = False) -> np.ndarray:
  """Each label's modified z-score (Iglewicz and Hoaglin) of its share among the shares of labels with examples:
  0.6745 (share - median) / MAD, or 0.7979 (share - median) / mean absolute deviation where the MAD is 0; 0 for
  labels without examples, and for all where every share is the same.

  `sampling` divides by sqrt(spread^2 + p (1 - p) / count) instead, the spread (MAD / 0.6745, or the mean
  absolute deviation / 0.7979) widened by the label's binomial variance at the pooled share p of all labels'
  examples: where a few examples per label make the shares (small counts at a strict level), chance alone then
  does not score as an outlier.
  """
  present = shares[counts > 0]
  median = np.median(present)
  mad = np.median(np.abs(present - median))
  mean_ad = np.mean(np.abs(present - median))
  if sampling:
    spread = mad / 0.6745 if mad > 0 else mean_ad / 0.7979
    pooled = np.sum(shares * counts) / np.sum(counts)
    scale = np.sqrt(spread ** 2 + pooled * (1 - pooled) / np.maximum(counts, 1))
    scores = np.where(scale > 0, (shares - median) / np.where(scale > 0, scale, 1.0), 0.0)
  elif mad > 0:
    scores = 0.6745 * (shares - median) / mad
  elif mean_ad > 0:
    scores = 0.7979 * (shares - median) / mean_ad
  else:
    scores = np.zeros(len(shares))
  return np.where(counts > 0, scores, 0.0)


def outlier_labels(label_probability: np.ndarray, labels: np.ndarray, num_classes: int, z: float,
                   levels: tuple[float, ...], sampling: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The labels whose share of examples given their label less than a level of `levels` has an outlier_scores
  above `z` (3.5 is Iglewicz and Hoaglin's cutoff) at that level, and every level's shares and scores (arrays of
  [len(levels), num_classes]); `label_probability` (a gauge's probability of each example's label) and `labels`
  cover the same examples.

  A gauge trained for a few epochs rejects some examples of every class (the hard ones); a dirty-label backdoor
  it has not learned puts other classes' images under one label, which it then rejects far more often than any
  other (docs/defense.md). A backdoor it has partly learned shows at a level near chance, one it has not learned
  at all at a strict level, where clean labels' hard examples are few.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes)
  shares = np.stack([np.bincount(labels[np.asarray(label_probability) < level], minlength=num_classes)
                     / np.maximum(counts, 1) for level in levels])
  scores = np.stack([outlier_scores(s, counts, sampling) for s in shares])
  return np.flatnonzero((scores > z).any(axis=0)), shares, scores


def dominant_label(shares: np.ndarray, counts: np.ndarray, ratio: float, z: float) -> np.ndarray:
  """The label (an array of none or one) whose share is at least `ratio` times every other label's, with a count
  improbable at the pooled share (improbable_counts at `z`); none where `ratio` is 0.

  A dirty-label backdoor at a high rate puts hundreds of other classes' images under one label, which a gauge that
  has not learned it rejects at about twice the rate of the hardest clean label; the clean labels' shares differ
  by class difficulty (easy and hard classes), which can widen the outlier score's spread enough to hide it.
  """
  shares, counts = np.asarray(shares, np.float64), np.asarray(counts, np.int64)
  if not ratio or np.count_nonzero(counts) < 2:
    return np.zeros(0, np.int64)
  top, top_ratio = top_share_ratio(shares, counts)
  if top_ratio < ratio:
    return np.zeros(0, np.int64)
  hits = np.round(shares * counts).astype(np.int64)
  return np.array([top], np.int64) if improbable_counts(hits, counts, z)[top] else np.zeros(0, np.int64)


def top_share_ratio(shares: np.ndarray, counts: np.ndarray) -> tuple[int, float]:
  """The label with the largest share among labels with examples (at least 2), and its share over the next
  largest (inf where only it is above 0; 0 where none is)."""
  shares = np.asarray(shares, np.float64)
  order = np.argsort(-np.where(np.asarray(counts) > 0, shares, -np.inf), kind="stable")
  top, second = int(order[0]), int(order[1])
  if not shares[top] > 0:
    return top, 0.0
  return top, float(shares[top] / shares[second]) if shares[second] > 0 else math.inf


def improbable_counts(hits: np.ndarray, counts: np.ndarray, z: float) -> np.ndarray:
  """Per label, whether its `hits` of `counts` examples are improbable at the rate pooled over all labels: the
  exact binomial chance of at least that many is at most a normal variable's chance of exceeding `z`.

  The guard for outlier_scores where hits are a handful: there its normal approximation makes 2 or 3 hits in one
  label, against none elsewhere, an outlier that chance gives often.
  """
  hits, counts = np.asarray(hits, np.int64), np.asarray(counts, np.int64)
  rate = hits.sum() / max(counts.sum(), 1)
  limit = 0.5 * math.erfc(z / math.sqrt(2))
  log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, max(counts.max(initial=0), 1) + 1)))])
  out = np.zeros(len(hits), bool)
  for k, (h, n) in enumerate(zip(hits, counts)):
    if h == 0 or rate >= 1:
      continue
    i = np.arange(h, n + 1)
    log_pmf = (log_factorial[n] - log_factorial[i] - log_factorial[n - i] + i * math.log(rate)
               + (n - i) * math.log1p(-rate))
    out[k] = np.exp(log_pmf).sum() <= limit
  return out


def coherence(features: np.ndarray) -> float:
  """The mean cosine similarity of every two rows of `features` (centred by the caller); NaN for fewer than 2."""
  if len(features) < 2:
    return float("nan")
  unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  total = unit.sum(axis=0)
  return float((total @ total - len(unit)) / (len(unit) * (len(unit) - 1)))


def prior_adjusted(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """`probabilities` (a model's, over examples with `labels`) with each class divided by its bias (the class's mean
  probability over the examples against its share of their labels) and renormalised; and the biases."""
  shares = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
  bias = probabilities.mean(axis=0) / np.maximum(shares, 1e-12)
  adjusted = probabilities / np.maximum(bias, 1e-12)
  return adjusted / np.maximum(adjusted.sum(axis=1, keepdims=True), 1e-12), bias


def disowned(targets: np.ndarray, labels: np.ndarray, rows: np.ndarray, below: float) -> np.ndarray:
  """Of `rows` (examples training toward a gauge's probabilities `targets`), those whose label the gauge gives
  less than `below`; their label's probability is set to 0 in `targets` (in place), the rest renormalised.

  A gauge that never saw a trigger still gives a backdoor example's target label about the probability the
  trigger alone earns on a clean model (the ASR floor); distilled, that share is learned back. Removing it
  teaches "not this label" on the examples the gauge rejects, which is what unlearning does, on fewer of them.
  """
  rows = np.asarray(rows, np.int64)
  own = targets[rows, labels[rows]]
  hit = rows[own < below]
  rest = 1.0 - targets[hit, labels[hit]]
  targets[hit, labels[hit]] = 0.0
  targets[hit] /= np.maximum(rest, 1e-12)[:, None]
  return hit


def beyond_excess(own: np.ndarray, labels: np.ndarray, rejected: np.ndarray, flagged: np.ndarray,
                  below: float) -> np.ndarray:
  """Of the `rejected` examples (mask) of each `flagged` label, those left after its excess over the count a clean
  label would have, the rejected share of the unflagged labels (`own` < `below`) times its examples, is taken,
  surest (lowest `own`) first: the ones most likely clean (mask)."""
  clean = ~np.isin(labels, flagged)
  rate = (own[clean] < below).mean() if clean.any() else 0.0
  spared = np.zeros(len(own), bool)
  for label in flagged:
    rows = np.flatnonzero(rejected & (labels == label))
    excess = max(len(rows) - int(round(rate * (labels == label).sum())), 0)
    spared[rows[np.argsort(own[rows], kind="stable")[excess:]]] = True
  return spared


def rejected_shares(pool_rejected: np.ndarray, pool_labels: np.ndarray, outside_rejected: np.ndarray,
                    outside_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """[2, len(labels)]: for each of `labels`, the share of its pool examples and of its examples outside the pool
  that a gauge rejects (`*_rejected`, per example); NaN where it has none there.

  Where a label holds a backdoor, each share follows the share of its examples there that are poisoned: a pool
  share under the outside one says isolation did not gather the label's poison in the pool (docs/defense.md).
  """
  shares = np.full((2, len(labels)), np.nan)
  for i, label in enumerate(np.asarray(labels)):
    for row, (rejected, of) in enumerate(((pool_rejected, pool_labels), (outside_rejected, outside_labels))):
      mine = np.asarray(rejected, bool)[np.asarray(of) == label]
      if len(mine):
        shares[row, i] = float(np.mean(mine))
  return shares


def owned(targets: np.ndarray, labels: np.ndarray, rows: np.ndarray, above: float) -> np.ndarray:
  """Of `rows` (examples training toward a gauge's probabilities `targets`), those whose label the gauge gives at
  least `above`; their targets become their label, one-hot (in place).

  A confident gauge that never saw the example's trigger rarely backs a backdoor's label (docs/defense.md);
  fitting its softer beliefs instead costs clean accuracy when fine-tuning is long.
  """
  rows = np.asarray(rows, np.int64)
  hit = rows[targets[rows, labels[rows]] >= above]
  targets[hit] = 0.0
  targets[hit, labels[hit]] = 1.0
  return hit


def top_direction(features: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
  """Examples' `features` centred and projected on their top singular direction, signed so that the projections'
  skewness is >= 0 (a singular vector's sign is arbitrary); that skewness; and the singular values."""
  x = features - features.mean(axis=0)
  _, singular, directions = np.linalg.svd(x, full_matrices=False)
  projection = x @ directions[0]
  skewness = float(np.mean(projection ** 3) / max(np.mean(projection ** 2), 1e-30) ** 1.5)
  return (projection if skewness >= 0 else -projection), abs(skewness), singular


def kurtosis(projection: np.ndarray) -> float:
  """The Pearson kurtosis (fourth standardised moment; 3 for a normal, 1.8 for a uniform) of `projection`."""
  x = projection - projection.mean()
  return float(np.mean(x ** 4) / max(np.mean(x ** 2), 1e-30) ** 2)


def two_means_split(projection: np.ndarray) -> float:
  """The threshold that splits `projection` into two groups with the least summed within-group variance (1-D
  2-means, exact): the midpoint between the two sorted values it falls between."""
  values = np.sort(np.asarray(projection, np.float64))
  n = len(values)
  total, squares = np.cumsum(values), np.cumsum(values ** 2)
  left = np.arange(1, n)
  within = (squares[:-1] - total[:-1] ** 2 / left) + (
      squares[-1] - squares[:-1] - (total[-1] - total[:-1]) ** 2 / (n - left))
  j = int(np.argmin(within))
  return float((values[j] + values[j + 1]) / 2)


def pursuit_direction(features: np.ndarray, dims: int, iterations: int = 100) -> tuple[np.ndarray, float]:
  """Examples' `features` projected on the direction of largest skewness among their top `dims` principal
  components, each scaled to unit variance (projection pursuit, started from each component), signed so that the
  skewness is >= 0; and that skewness. Unlike the top singular direction it finds a minority whose shared feature
  is not the label's largest spread."""
  x = features.astype(np.float64) - features.mean(axis=0)
  u, singular, _ = np.linalg.svd(x, full_matrices=False)
  keep = int(min(dims, np.sum(singular > 1e-6 * max(singular[0], 1e-30))))
  z = u[:, :keep] * np.sqrt(len(x))  # Whitened: every kept component has unit variance.
  best, best_projection = 0.0, np.zeros(len(x))
  for start in range(keep):
    w = np.eye(keep)[start]
    for _ in range(iterations):  # Fixed point of E[z (w.z)^2]: a stationary third moment (FastICA's update).
      step = (z * ((z @ w) ** 2)[:, None]).mean(axis=0)
      norm = np.linalg.norm(step)
      if norm < 1e-12:
        break
      step /= norm
      done = abs(step @ w) > 1 - 1e-10
      w = step
      if done:
        break
    projection = z @ w
    skewness = float(np.mean(projection ** 3) / max(np.mean(projection ** 2), 1e-30) ** 1.5)
    if abs(skewness) > abs(best):
      best, best_projection = skewness, projection
  return (best_projection if best >= 0 else -best_projection), abs(best)


def _side_difference(images: np.ndarray, rows: np.ndarray, far: np.ndarray) -> np.ndarray:
  """The mean of `images[rows[far]]` minus the mean of `images[rows[~far]]` (float32); zeros if a side is empty."""
  if not far.any() or far.all():
    return np.zeros(images.shape[1:], np.float32)
  return images[rows[far]].astype(np.float32).mean(0) - images[rows[~far]].astype(np.float32).mean(0)


def candidate_triggers(images: np.ndarray, labels: np.ndarray, features: np.ndarray, num_classes: int,
                       tail: float, dims: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """Per label, a candidate trigger: the mean image of its pursuit tail (`pursuit_direction` on the examples'
  `features`, beyond `tail` robust standard deviations) minus the mean of the rest of the label's images
  ([num_classes, H, W, C] float32, pixel units; zeros for a label with fewer than 3 examples), and each tail's
  example indices. A trigger shared by a minority of a label is what such a minority's images have in common."""
  deltas = np.zeros((num_classes,) + images.shape[1:], np.float32)
  tails = []
  for label in range(num_classes):
    mine = np.flatnonzero(labels == label)
    far = np.zeros(len(mine), bool)
    if len(mine) >= 3:
      projection, _ = pursuit_direction(features[mine], dims)
      far = projection > tail_cut(projection, tail)
    deltas[label] = _side_difference(images, mine, far)
    tails.append(mine[far])
  return deltas, tails


def pool_candidate_triggers(images: np.ndarray, labels: np.ndarray, features: np.ndarray, pool: np.ndarray,
                            num_classes: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """Per label, a candidate trigger from its examples in `pool`: split in two along their top feature direction
  (`top_direction`, `two_means_split`), the mean image of the smaller side minus the mean of the larger
  ([num_classes, H, W, C] float32, pixel units; zeros where the label has fewer than 3 pool examples), and each
  smaller side's example indices. A clean-label trigger the pool gathers is a minority mode of the label's pool."""
  deltas = np.zeros((num_classes,) + images.shape[1:], np.float32)
  tails = []
  for label in range(num_classes):
    mine = np.sort(np.asarray(pool)[labels[pool] == label])
    far = np.zeros(len(mine), bool)
    if len(mine) >= 3:
      projection, _, _ = top_direction(features[mine])
      far = projection > two_means_split(projection)
      if far.sum() > len(far) / 2:
        far = ~far
    deltas[label] = _side_difference(images, mine, far)
    tails.append(mine[far])
  return deltas, tails


def within_rank(scores: np.ndarray) -> np.ndarray:
  """Each score's rank among `scores` as a share in [0, 1): 0 for the lowest (stable for ties)."""
  return np.argsort(np.argsort(scores, kind="stable"), kind="stable") / max(len(scores), 1)


class Spectral(NamedTuple):
  """What abl.spectral_outliers found: flagged labels, the examples to disown, and every label's statistics."""
  flagged: np.ndarray  # Labels flagged by either test, ascending.
  suspected: np.ndarray  # Example indices to disown, ascending.
  skewness: np.ndarray  # [num_classes] size of the skewness of each label's top-direction projections.
  kurtosis: np.ndarray  # [num_classes] their kurtosis (0 for a label with fewer than 3 examples or no spread).
  bimodal: np.ndarray  # The flagged labels split in two (kurtosis test), ascending.
  projection: np.ndarray  # [N] each example's projection on its label's top direction (long side positive), or on
  #                         the pursuit direction for a label the pursuit test flagged.
  cut: np.ndarray  # [num_classes] where a flagged label was cut (NaN elsewhere): suspects lie beyond it.
  pursued: np.ndarray = np.zeros(0, np.int64)  # The flagged labels the pursuit test found, ascending.
  pursuit_rank: np.ndarray = np.zeros(0)  # [num_classes] the pursuit tail's median loss rank in its label (NaN: not
  #                                         run; the pursuit test off or the label flagged before it).
  deferred: np.ndarray = np.zeros(0, np.int64)  # Labels split in two for a gauge to choose the suspected mode (the
  #                                               kurtosis outlier test), ascending; cut in `cut`, none suspected.
  kurtosis_scores: np.ndarray = np.zeros(0)  # [num_classes] each label's kurtosis outlier score (low side).


def spectral_outliers(features: np.ndarray, labels: np.ndarray, scores: np.ndarray, num_classes: int, skew: float,
                      tail: float, kurtosis_below: float = 0.0, pursuit_rank: float = 0.0,
                      pursuit_dims: int = 16, bimodality: float = 0.0, kurtosis_z: float = 0.0) -> Spectral:
  """Spectral signatures per label (Tran et al., 2018): each label's examples projected on the top singular
  direction of their centred `features`, two tests of that projection a label without poison passes, and the
  isolation losses `scores` to tell a backdoor, which the isolation model learns first, from hard examples.

  Split in two (`kurtosis_below` > 0 and the kurtosis at most that): a trigger on about half of a label's examples
  (a dirty-label backdoor's target, a clean-label attack on half of its class) gives two separate modes; the
  projection is cut where two groups have the least within-group variance and the group with the lower median
  score is suspected. Split in two as well (`bimodality` > 0), a label too little skewed for the next test (size
  under `skew`) whose bimodality coefficient (skewness squared + 1) / kurtosis (Sarle's; 1/3 for a normal, 5/9 for a
  uniform) is at least `bimodality`: two modes in unequal shares, a trigger on a third of the label, which is too
  skewed for the kurtosis cut and too little for the skewness one. Otherwise skewed (size at least `skew` > 0): a
  minority sharing a feature the rest lack; its examples more than `tail` robust standard deviations (1.4826 MAD)
  beyond the median on the long side are
  suspected if their median score is below the rest of the label's (a clean label's long tail is its hardest
  examples; docs/defense.md).

  Pursued (`pursuit_rank` > 0), for a label neither test flags: the same long tail along the most skewed direction
  of its top `pursuit_dims` whitened principal components (`pursuit_direction`), suspected if the tail's median
  loss rank within the label is below `pursuit_rank`: every label has a skewed direction, but a clean label's is
  its hardest examples, and a trigger's minority is what the isolation model fits best.

  Deferred (`kurtosis_z` > 0), a label no test above flags whose kurtosis is a low outlier among the labels'
  (outlier_scores of minus the kurtosis above `kurtosis_z`): two modes too close or too unequal for the kurtosis
  cut, where the isolation model need not have fitted the poisoned mode first (input-aware); its projection is cut
  as the kurtosis test cuts it, and a gauge judges the sides later (`judged_side`, `side_outlier_scores`).

  Two modes 4 standard deviations apart in equal shares give a kurtosis of 1.72, a normal 3; a minority of 3-20%
  3.5 standard deviations apart a skewness of about 0.9-1.2 (docs/defense.md has the labels measured without poison).
  """
  sizes, kurt, cuts = np.zeros(num_classes), np.zeros(num_classes), np.full(num_classes, np.nan)
  ranks = np.full(num_classes, np.nan)
  projections = np.zeros(len(labels))
  hits, flagged, bimodal, pursued = [], [], [], []
  for label in range(num_classes):
    mine = np.flatnonzero(labels == label)
    if len(mine) < 3:
      continue
    projection, sizes[label], _ = top_direction(features[mine])
    projections[mine] = projection
    if np.ptp(projection) <= 1e-12 * max(np.abs(projection).max(), 1.0):
      continue  # Features identical within the label: nothing to test.
    kurt[label] = kurtosis(projection)
    unequal = (bimodality > 0 and (skew <= 0 or sizes[label] < skew)
               and (sizes[label] ** 2 + 1) / kurt[label] >= bimodality)
    if kurtosis_below > 0 and kurt[label] <= kurtosis_below or unequal:
      cut = two_means_split(projection)
      if np.median(scores[mine[projection <= cut]]) < np.median(scores[mine[projection > cut]]):
        projection, cut = -projection, -cut  # The mode learned first on the positive side.
      bimodal.append(label)
    else:
      cut = tail_cut(projection, tail)
      far = projection > cut
      skewed = (skew > 0 and sizes[label] >= skew and far.any() and not far.all()
                and np.median(scores[mine[far]]) < np.median(scores[mine[~far]]))  # Not a clean label's hardest.
      if not skewed:
        if pursuit_rank <= 0:
          continue
        projection, _ = pursuit_direction(features[mine], pursuit_dims)
        cut = tail_cut(projection, tail)
        far = projection > cut
        if not far.any() or far.all():
          continue
        ranks[label] = float(np.median(within_rank(scores[mine])[far]))
        if ranks[label] >= pursuit_rank:
          continue
        pursued.append(label)
    projections[mine], cuts[label] = projection, cut
    hits.append(mine[projection > cut])
    flagged.append(label)
  suspected = np.sort(np.concatenate(hits)) if hits else np.zeros(0, np.int64)
  kurtosis_scores = kurtosis_outlier_scores(kurt, np.bincount(labels, minlength=num_classes))
  deferred = [label for label in range(num_classes) if kurtosis_z > 0 and kurtosis_scores[label] > kurtosis_z
              and label not in flagged]
  for label in deferred:
    cuts[label] = two_means_split(projections[labels == label])
  return Spectral(np.asarray(flagged, np.int64), suspected, sizes, kurt, np.asarray(bimodal, np.int64), projections,
                  cuts, np.asarray(pursued, np.int64), ranks, np.asarray(deferred, np.int64), kurtosis_scores)


def kurtosis_outlier_scores(kurt: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Each label's outlier_scores of minus its kurtosis (`kurt`; 0 for a label without one, which is not compared),
  `counts` its examples: high where a label's projection is flatter than the others', two modes."""
  present = np.asarray(counts) * (np.asarray(kurt) > 0)
  return outlier_scores(-np.asarray(kurt), present) if present.any() else np.zeros(len(kurt))


def side_outlier_scores(label_probability: np.ndarray, labels: np.ndarray, side: np.ndarray, label: int,
                        num_classes: int, levels: tuple[float, ...]) -> np.ndarray:
  """[len(levels)] `label`'s outlier_scores (with the binomial spread) among the labels' shares of examples given
  their label less than each level, where its examples are those in `side` (a boolean mask over all) alone: the
  outlier label test on the part of a label its features single out, which holds its poison where it has any."""
  keep = (np.asarray(labels) != label) | np.asarray(side, bool)
  return outlier_labels(np.asarray(label_probability)[keep], np.asarray(labels)[keep], num_classes, np.inf,
                        levels)[2][:, label]


def judged_side(projection: np.ndarray, cut: float, own: np.ndarray) -> bool:
  """Whether a deferred label's examples above `cut` (their `projection`) are the mode a gauge gives the label
  less on average (`own`, its probability of the label, for the same examples): a dirty-label backdoor's mode holds
  other classes' images, which a gauge that has not fully learned the trigger rejects more often."""
  above = np.asarray(projection) > cut
  return bool(np.mean(own[above]) < np.mean(own[~above]))


def tail_cut(projection: np.ndarray, tail: float) -> float:
  """`tail` robust standard deviations (1.4826 MAD) above the median of `projection`."""
  median = np.median(projection)
  return float(median + tail * max(1.4826 * np.median(np.abs(projection - median)), 1e-12))


def lowest_rank(scores: list[np.ndarray]) -> np.ndarray:
  """Each example's lowest rank (0 = lowest score) among several scorings, as a share of the set; ties by index.

  The isolation model at a constant learning rate ranks the backdoor examples lowest at different epochs on
  different seeds (docs/defense.md); an example low in any of the last epochs is suspect.
  """
  ranks = [np.argsort(np.argsort(np.asarray(s), kind="stable"), kind="stable") for s in scores]
  return np.min(ranks, axis=0) / len(scores[0])


def flagged_offsets(probabilities: np.ndarray, labels: np.ndarray, flagged: np.ndarray, num_classes: int,
                    rounds: int = 20) -> np.ndarray:
  """Logit offsets, zero but for the `flagged` labels, under which a model with these class `probabilities` (over
  examples with `labels`) gives each flagged label a mean probability equal to the median share of the other
  labels among `labels`: a label whose examples fine-tuning left out is predicted as often as a typical one."""
  offsets = np.zeros(num_classes)
  others = np.setdiff1d(np.arange(num_classes), flagged)
  if not len(flagged) or not len(others):
    return offsets
  target = float(np.median(np.bincount(labels, minlength=num_classes)[others] / len(labels)))
  logp = np.log(np.maximum(np.asarray(probabilities, np.float64), 1e-30))
  for _ in range(rounds if len(flagged) > 1 else 1):  # One label at a time, until they agree.
    for k in flagged:
      low, high = -30.0, 30.0
      for _ in range(60):  # The mean probability rises with the label's offset: bisection.
        offsets[k] = (low + high) / 2
        shifted = logp + offsets
        shifted -= shifted.max(axis=1, keepdims=True)
        share = np.mean(np.exp(shifted[:, k]) / np.exp(shifted).sum(axis=1))
        low, high = (offsets[k], high) if share < target else (low, offsets[k])
  return offsets


def stamped(images: np.ndarray, delta: np.ndarray) -> np.ndarray:
  """uint8 `images` with `delta` (float, pixel units) added, rounded and clipped to [0, 255]."""
  return np.clip(np.rint(images.astype(np.float32) + delta), 0, 255).astype(np.uint8)


def transfer_shares(predict: Callable[[np.ndarray, np.ndarray], tuple], images: np.ndarray, deltas: np.ndarray,
                    label: int) -> np.ndarray:
  """Per delta ([G, *image shape], pixel units), the share of uint8 `images` a model's `predict` (images, labels)
  -> (loss, class, ...) sends to `label` with it added, less the share it sends there without."""
  dummy = np.zeros(len(images), np.int32)
  before = np.mean(np.asarray(predict(images, dummy)[1]) == label)
  return np.array([np.mean(np.asarray(predict(stamped(images, d), dummy)[1]) == label) - before for d in deltas])


def transfer_z(observed: float, null: np.ndarray, count: int) -> float:
  """`observed`'s z-score among `null` (shares of `count` images), their spread at least one image's share."""
  return float((observed - np.mean(null)) / max(np.std(null), 1.0 / count)) if len(null) else float("nan")
