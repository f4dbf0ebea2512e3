"""Defaults shared by every experiment; `abl_<attack>.py` files change a few fields.

Variants (the part after ':' in `--config=configs/abl_sig.py:smoke`):
  (none)  the paper's setting: ResNet-18 on all of CIFAR-10 (an accelerator job).
  cpu     the small CNN on a 10,000-image class-balanced CIFAR-10 subset from the shared tar: 5 LGA + 6 gauge
          (at 16x16) + 4 fine-tuning epochs, or 8 epochs without defense (2-4 min each on 2 cores).
  fast    cpu with the airbench model and its recipe parts (label smoothing 0.2, heavier weight decay) and 10
          no-defense epochs: about the wall time of cpu's 8 small-CNN epochs (docs/benchmarks.md).
  smoke   tiny synthetic data, the small CNN, a few steps (seconds; what tests and CI use).
"""
from __future__ import annotations

import ml_collections

VARIANTS = ("", "cpu", "fast", "smoke")
CPU_VARIANTS = ("cpu", "fast")  # The variants on the CPU subset of CIFAR-10: attack configs shrink both alike.
SHARED_CIFAR10 = "../shared/datasets/cifar10-jpeg.tar.gz"


def base_config() -> ml_collections.ConfigDict:
  """The full-size (accelerator) defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # One key for everything; split per purpose (poison, init, data order, augmentation).

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"  # One of: tfds, folder, synthetic.
  c.data.name = "cifar10"  # tfds dataset name (source=tfds).
  c.data.path = SHARED_CIFAR10  # Image folder or .tar.gz of one (source=folder).
  c.data.cache_dir = ""  # Where decoded folder arrays are cached; '' = ~/.cache/abl_jax.
  c.data.tfds_data_dir = ""  # tfds data_dir; '' = the tfds default (~/tensorflow_datasets).
  c.data.train_size = 0  # Class-balanced training subset of this size; 0 = the whole set.
  c.data.test_size = 0  # Class-balanced test subset; 0 = the whole test set.
  c.data.synthetic_train_size = 512  # Examples per split for source=synthetic...
  c.data.synthetic_test_size = 256  # ...and its test split.
  c.data.synthetic_classes = 10  # Number of classes for source=synthetic.
  c.data.image_size = 32  # Side of synthetic images (real data keeps its own size).
  c.data.mean = (0.4914, 0.4822, 0.4465)  # Per-channel normalisation, applied on device.
  c.data.std = (0.2470, 0.2435, 0.2616)

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet18"  # One of: resnet18, wrn16_1, small_cnn, airbench (fast recipe: see 'fast' below).
  c.model.width = 64  # Base width (resnet18: 64; small_cnn: 16 -> widths 16-32-64; airbench: 64 -> 64-256-256).

  c.attack = ml_collections.ConfigDict()
  c.attack.name = "badnets"  # One of: none, badnets, blend, sig, clean_label, input_aware, wanet (their
  #                             fields: add_clean_label, add_input_aware, add_wanet).
  c.attack.target_label = 0  # The class the backdoor points to.
  c.attack.poison_rate = 0.1  # Share of the WHOLE training set that is poisoned, for every attack.
  c.attack.floor_model = ""  # A finished run's workdir (same test set; the clean-data run): the final evaluation
  #                            also applies this run's trigger to its model, the ASR a model that never learned the
  #                            backdoor shows (results.json floor_asr; the table sets its clean row). '' = none.
  c.attack.alpha = 0.2  # blend: weight of the pattern, at train and test time.
  c.attack.pattern = "noise"  # blend: 'noise' (uniform noise from pattern_seed) or an image path.
  c.attack.pattern_seed = 0  # blend: seed of the noise pattern.
  c.attack.delta = 30.0  # sig: amplitude on the 0..255 scale (seed report 30; ABL code 20).
  c.attack.freq = 6.0  # sig: number of periods across the image width.

  c.defense = ml_collections.ConfigDict()
  c.defense.name = "abl"  # One of: none (plain training), abl.

  c.abl = ml_collections.ConfigDict()
  c.abl.isolation_epochs = 20  # Epochs of LGA training before isolation (paper T_te = 20).
  c.abl.isolation_lr = 0.1  # Constant SGD learning rate of the isolation phase.
  c.abl.loss = "lga"  # Isolation loss: lga (sign(CE - gamma) * CE) or flooding (|CE - gamma| + gamma).
  c.abl.gamma = 0.5  # LGA / flooding threshold on the batch-mean cross-entropy.
  c.abl.isolation_ratio = 0.01  # Share of training examples isolated (lowest LGA-model loss).
  # The defaults below are abl-jax's defense (docs/defense.md): a suspicious pool of the 20% with the lowest loss
  # for their label is judged by a gauge model trained without it: the pool examples it backs keep their label,
  # those it rejects train toward "not this label", the rest stay out, while fine-tuning continues the isolation
  # model; no unlearning. The paper's ABL: score_epochs=1, pool_rule=isolated,
  # return_rule=none, finetune_schedule=step, finetune_balance=False, unlearning_epochs=5, unlearning_mode=ascent,
  # unlearning_loss=neg_ce, joint_exclude_ratio=0, candidate_triggers=0 (docs/defense.md lists the flags of each
  # defense the docs compare).
  c.abl.score_epochs = 3  # The pool ranks examples by their lowest rank over the losses after each of the
  #                         isolation phase's last score_epochs epochs (1: the last epoch's loss; >= 1).
  c.abl.pool_rule = "class_ratio"  # Which examples are suspicious (the pool): isolated (the isolated set
  #                                  only, the paper), ratio (the lowest pool_ratio of the isolation scores) or
  #                                  class_ratio (the lowest pool_ratio of the log-scores minus their training
  #                                  label's class_quantile, each scoring measured within its label before
  #                                  ranking); the isolated set is always in it.
  c.abl.pool_ratio = 0.2  # ratio, class_ratio: share of the training set in the suspicious pool, in [0, 1).
  c.abl.class_quantile = 0.8  # class_ratio: the quantile of its label's log-scores an example is measured
  #                             against, in (0, 1]; it must lie above the target label's share of poison
  #                             (a dirty-label attack on p of the set with 10 classes: p / (p + 0.1), i.e.
  #                             0.8 holds up to p = 0.4); 0.5 is the median.
  c.abl.finetune_init = "isolation"  # Fine-tuning starts from the isolation model (the paper), from fresh
  #                                    weights (scratch) or from the gauge (the last one trained; needs
  #                                    gauge_epochs > 0): the last two do not keep the isolation model's backdoor.
  c.abl.finetune_epochs = 60  # Epochs of fine-tuning: the examples outside the pool, and what return_rule gives back.
  c.abl.finetune_lr = 0.1  # Fine-tuning (peak) learning rate.
  c.abl.finetune_schedule = "cosine"  # step (x0.1 at each boundary below, the paper) or cosine (to 0).
  c.abl.finetune_lr_boundaries = (40, 60)  # step: epochs (within fine-tuning) where the lr drops 10x.
  c.abl.finetune_mix = "none"  # none, cutmix or mixup: each fine-tuning image mixed with another of its batch, the
  #                               loss split between their labels by their shares (train.mix).
  c.abl.gauge_mix = "none"  # none, cutmix or mixup: the gauges' images mixed as finetune_mix mixes fine-tuning's
  #                          (finetune_mix_alpha), in every gauge epoch: a trigger that must match its image (the
  #                          input-aware attack's) is then harder for a gauge to learn from the poison outside the
  #                          pool.
  c.abl.gauge_drop = 0.0  # In [0, 1]: each gauge step trains on its batch but this share of the examples with the
  #                         highest loss (the small-loss selection of learning with noisy labels): poison isolation
  #                         left outside the pool looks mislabelled until its trigger is learned, so the gauges
  #                         learn less of the trigger. 0 = off.
  c.abl.gauge_drop_epochs = 0  # gauge_drop: in this many of the gauge's first epochs only, then every example
  #                              (0 = in every epoch); a second gauge that goes on from the first
  #                              (regauge_init=gauge) counts on from the first's epochs.
  c.abl.gauge_drop_cap = 0.5  # gauge_drop: at most this share (in (0, 1]) of any label's examples in a batch is
  #                             left out, so that a class the gauge has not learned yet is not left out altogether
  #                             (gauge_drop=1: each label's highest share this large, whatever the others').
  c.abl.finetune_mix_alpha = 1.0  # finetune_mix: the mixing share is drawn from Beta(alpha, alpha) (> 0).
  c.abl.finetune_mix_epochs = 0  # finetune_mix: mix in this many of fine-tuning's first epochs only (0 = in all).
  c.abl.finetune_balance = True  # Draw fine-tuning (and gauge) batches class-balanced by training label (the
  #                                 pool can take most of one class), with replacement; False: each example once.
  c.abl.return_rule = "agree"  # none (the suspicious pool stays out of fine-tuning) or agree (after
  #                             return_epoch epochs, the pool examples the fine-tuned model predicts with their
  #                             training label rejoin fine-tuning; the rest, the kept-out set, stay out).
  c.abl.return_epoch = 0  # agree without a gauge: fine-tuning epochs before the pool is checked, in
  #                         [1, finetune_epochs); the fine-tuned model so far judges.
  c.abl.gauge_epochs = 20  # agree: > 0 trains a separate model this many epochs from fresh weights outside
  #                         the pool to judge it; fine-tuning then runs whole from finetune_init.
  c.abl.gauge_downsample = 1  # gauge_epochs > 0: the gauges train on, and judge, the training images averaged
  #                               over blocks of this side (an integer >= 1 dividing the image size; 2: 16x16 on
  #                               CIFAR-10, about a quarter of the compute); 1: as they are.
  c.abl.kept_out = "distill"  # agree: the pool examples the judge disagrees with stay out (drop) or, where its
  #                          probability is at least relabel_confidence, train with its prediction (relabel);
  #                          distill: every pool example trains toward the judge's class probabilities.
  c.abl.contradict_factor = 0.0  # distill: > 0 also trains toward the gauge's probabilities every example outside
  #                                the pool whose label the gauge (predicting another class) gives at most 1/factor
  #                                of the isolation model's probability; 0 = off, else >= 1 (docs/defense.md: 10
  #                                helps input-aware but cost clean data 1.35 CA points on seed 1).
  c.abl.disown_below = 0.1  # distill: examples whose label the gauge gives less than this train toward its
  #                           probabilities with their label's share set to 0 ("not this label"); in [0, 1),
  #                           0 = off (session 8's default); 0.1 is chance with 10 classes (docs/defense.md).
  c.abl.class_outlier_z = 3.5  # distill, with disown_below: > 0 also disowns the examples outside the pool whose
  #                               label the gauge gives less than disown_below, in every label where that happens
  #                               unusually often: a modified z-score of the label's share of them among all
  #                               labels' shares above this (3.5: Iglewicz and Hoaglin's outlier cutoff); 0 = off.
  #                               A dirty-label backdoor that isolation missed (WaNet) shows so (docs/defense.md).
  c.abl.class_outlier_below = (0.1, 0.05, 0.02)  # class_outlier_z: the labels' shares are compared at each of
  #                               these levels (the gauge gives the label less than the level), a label flagged at
  #                               any; each in (0, 1), scored with the binomial spread of a share added (a backdoor
  #                               the gauge has not learned at all shows at a strict level). (): disown_below
  #                               alone without that spread (before 2026-12-03). Flagged labels' examples below
  #                               disown_below: flagged_rejected.
  c.abl.class_outlier_ratio = 1.6  # class_outlier_z with levels: > 1 also flags the label whose share at the
  #                               loosest level is at least this many times every other label's, with a count
  #                               improbable at the pooled share; 0 = off (before session 41). Clean labels'
  #                               shares differ by class difficulty (the top 1.00-1.30x the next on 16 clean
  #                               judgements), which can hide a 10% dirty-label backdoor (1.95-2.85x on 14) from
  #                               the outlier score (docs/defense.md, session 41).
  c.abl.flagged_rejected = "disown"  # class_outlier_z: a flagged label's examples outside the pool that the gauge
  #                               gives less than disown_below train toward its probabilities with their label's
  #                               share set to 0 (disown), or stay out of fine-tuning (drop), or as many as exceed
  #                               the count a clean label would have (the unflagged labels' rejected share times
  #                               the label's examples outside the pool) are disowned, the surest first, and the
  #                               rest stay out (excess; session 42: the target class +0.9 points on average over
  #                               12 runs, ASR +0.5).
  c.abl.flagged_doubted = "keep"  # class_outlier_z: a flagged label's examples outside the pool that the gauge
  #                               gives at least disown_below but less than own_above train with their label
  #                               (keep), or stay out of fine-tuning (drop), as the pool's unsure ones do, or
  #                               stay out until the relearned check (relearned_at), where those the model being
  #                               fine-tuned backs (prior-adjusted probability of their label >= own_above) rejoin
  #                               (return; it needs the check: relearned_at > 0, finetune_epochs >= 2).
  c.abl.flagged_unsure = "auto"  # class_outlier_z with unsure=drop: a flagged label's pool examples that the gauge
  #                               neither backs nor rejects stay out of fine-tuning, as every label's do (drop), or
  #                               train with their label, as its doubted examples outside the pool do (keep), or
  #                               do so where the gauge rejects a smaller share of the label's pool examples than
  #                               of its examples outside the pool: isolation did not gather its poison (auto).
  c.abl.calibrate_flagged = False  # class_outlier_z: True offsets the final model's logit of each flagged label so
  #                                   that its mean probability over the training images equals the median share
  #                                   of the other labels (fine-tuning leaves out most of a flagged label's examples
  #                                   with flagged_doubted=drop or return); calibration.npz, applied at evaluation.
  c.abl.spectral_skew = 0.8  # distill: > 0 flags each label whose examples' isolation-model features (the input of
  #                            its last layer), projected on their top singular direction, have a skewness of at
  #                            least this size (spectral signatures: a trigger shared by a minority of a label);
  #                            its examples beyond spectral_tail on the long side join the pool and are disowned,
  #                            whatever the gauge says, if the isolation model fits them better than the rest of
  #                            the label (median loss; since 2026-12-05); 0 = off (before 2026-12-04). A
  #                            minority of 3-20% of a label 3.5 standard deviations apart gives 0.9-1.2; labels
  #                            without poison measured up to 0.95, their tails the examples fitted worst
  #                            (docs/defense.md, sessions 15 and 16).
  c.abl.spectral_kurtosis = 1.8  # distill: > 0 (in (1, 3)) flags each label whose top-direction projections (as
  #                                for spectral_skew) have a kurtosis of at most this: two separate modes, a trigger
  #                                on about half of the label's examples; the mode with the lower median isolation
  #                                loss joins the pool and is disowned; 0 = off (before 2026-12-05). Two equal
  #                                modes 4 standard deviations apart give 1.72, a uniform 1.8, a normal 3; labels
  #                                without poison measured at least 2.33, half-poisoned ones 1.16-1.50 where the
  #                                trigger separates them (docs/defense.md, session 16).
  c.abl.spectral_bimodality = 0.0  # distill: > 0 (in (1/3, 1]) also splits in two, as spectral_kurtosis does, a
  #                                  label skewed less than spectral_skew whose bimodality coefficient (skewness^2 +
  #                                  1) / kurtosis is at least this: two modes in unequal shares (a trigger on a
  #                                  third of the label), between the two tests above. 5/9 is a uniform's, 1/3 a
  #                                  normal's; labels without poison measured at most 0.49 (docs/defense.md, session
  #                                  35); 0 = off.
  c.abl.spectral_kurtosis_z = 3.5  # class_outlier_z with a gauge: > 0 also splits in two, as spectral_kurtosis
  #                                  cuts, a label no spectral test flags whose kurtosis is a low outlier among the
  #                                  labels' (modified z-score of minus the kurtosis above this; 3.5 is Iglewicz and
  #                                  Hoaglin's cut-off); where the gauge's outlier test does not flag the label, the
  #                                  side the gauge gives the label less on average (its examples outside the pool)
  #                                  is disowned if that side's share of rejected examples is an outlier among the
  #                                  labels' (class_outlier_z, class_outlier_below): a backdoor on about half of a
  #                                  label that the isolation model need not fit first (input-aware); 0 = off
  #                                  (before session 36). Labels without poison measured up to 3.67, input-aware's
  #                                  target 4.2-6.0 where its poison splits the label (docs/defense.md, session 36).
  c.abl.spectral_pursuit = 0.0  # distill: > 0 (in (0, 1)) also tests each label neither test above flags along
  #                               the most skewed direction of its features' top spectral_pursuit_dims principal
  #                               components scaled to unit variance (projection pursuit): its examples beyond
  #                               spectral_tail on the long side join the pool and are disowned if their median
  #                               isolation-loss rank within the label is below this (a trigger's minority is
  #                               fitted first, a clean label's tail there is its hardest examples); 0 = off.
  #                               Measured (session 28): poisoned tails 0.09-0.18 where it finds them, labels
  #                               without poison down to 0.22, and 0.06 and 0.14 on two of about 40 runs: an
  #                               option, not the default (docs/defense.md).
  c.abl.spectral_pursuit_dims = 16  # spectral_pursuit: principal components searched (>= 2).
  c.abl.candidate_triggers = 0.5  # > 0 (in (0, 1]): in fine-tuning, each image gets, with this probability, the
  #                                 candidate trigger of a label other than its own added (its label kept): per
  #                                 label, the mean image of its pursuit tail (spectral_pursuit_dims, spectral_tail,
  #                                 on the isolation model's features) minus the rest of the label's, which is a
  #                                 trigger's where a minority of the label shares one (SIG's sinusoid, BadNets'
  #                                 patch), so the model learns that the trigger does not mean that label; a clean
  #                                 label's is a blurred shift of colour, label-keeping augmentation. 0 = off
  #                                 (before 2026-12-06, session 29; docs/defense.md).
  c.abl.candidate_scale = (0.5, 2.0)  # candidate_triggers: each added candidate is multiplied by a factor drawn
  #                                     uniformly from (low, high), 0 < low <= high: a tail's mean holds a trigger
  #                                     diluted by the tail's clean images, and a test trigger may be stronger.
  c.abl.candidate_pool = False  # candidate_triggers: a second candidate per label, from its suspicious pool: its
  #                               pool examples split in two along their top feature direction (two-means), the
  #                               smaller side's mean image minus the larger's (a clean-label trigger gathered by the
  #                               pool, which the label-wide tail misses: SIG 1% on frog, docs/defense.md session
  #                               39); each added candidate is either of its label's two, drawn uniformly. An option.
  c.abl.spectral_tail = 2.0  # spectral_skew, spectral_pursuit: robust standard deviations (1.4826 MAD) beyond the
  #                            median (> 0).
  c.abl.spectral_judged = False  # class_outlier_z: True treats a label spectral signatures flagged as an outlier
  #                                label too (its examples outside the pool the gauge rejects are disowned, a second
  #                                gauge judges again): the poison outside the suspects (docs/defense.md, session 17).
  c.abl.pool_outlier_z = 0.0  # class_outlier_z: > 0 also treats as an outlier label each label whose share of
  #                             pool examples the gauge rejects (under disown_below; the spectral suspects aside)
  #                             scores above this (modified z-score, as class_outlier_z): a low-rate backdoor
  #                             isolation found most of, whose rest outside the pool is too few to show there
  #                             (docs/defense.md, session 20); 0 = off.
  c.abl.regauge = True  # class_outlier_z: where it flags a label, train a second gauge (regauge_init,
  #                       regauge_epochs) without the pool and the examples the first rejected there, and judge
  #                       again with it (regauged.npz); fine-tuning follows the second judgement. False: the first's.
  c.abl.regauge_init = "gauge"  # regauge: the second gauge goes on from the first "gauge" without those examples,
  #                               or starts from "fresh" weights (the default until session 21: 3x the cost, the
  #                               same judgement; docs/defense.md).
  c.abl.regauge_epochs = 0  # regauge: the second gauge's epochs (>= 0); 0 = a third of gauge_epochs (at least 1)
  #                           going on from the gauge, all of them from fresh weights.
  c.abl.relearned_at = 0.5  # class_outlier_z, with a gauge: after this share of fine-tuning's epochs (in [0, 1);
  #                            0 = off; at least 1, before the last), the model being
  #                            fine-tuned scores the examples outside the pool the judge rejected (below
  #                            disown_below) that still train with their label; a label whose share of them it has
  #                            learned (relearned_above, its class bias removed) is an outlier (class_outlier_z; its
  #                            count also improbable by the exact binomial tail at the labels' pooled rate), and
  #                            whose learned ones' features align more than the rest of its rejected and than its
  #                            typical examples (backed by the judge, learned), has those examples disowned
  #                            (flagged_rejected) and fine-tuning acts on relearned_then: a backdoor the gauge's
  #                            outlier test missed, which fine-tuning is learning (docs/defense.md, sessions 18-19).
  c.abl.relearned_above = 0.8  # relearned_at: the fine-tuned model's probability of the label that counts as
  #                              learned, in (0, 1].
  c.abl.relearned_draws = 20  # relearned_at: a label passing the check's tests is flagged only where the mean
  #                             image of its learned rejected examples, less its unrejected examples', added to
  #                             other labels' images sends more of them to it than that of as many of its
  #                             unrejected examples does (z-score > class_outlier_z among this many random groups;
  #                             >= 0, 0 = off): a trigger, not hard examples (docs/defense.md, session 33).
  c.abl.relearned_tested = "outliers"  # relearned_draws: the labels whose transfer is tested: those the check's
  #                                      other tests flag (outliers), or every label with at least 2 learned
  #                                      rejected examples, flagged on the transfer test alone (learned; 0.03x of
  #                                      the no-defense training's work per label tested on the cpu table; it
  #                                      flagged clean labels on 2 of 7 runs, docs/defense.md, session 33).
  c.abl.relearned_untypical = "skip"  # relearned_at: a label passing the check's other tests that has fewer than 2
  #                                    typical examples (the judge backs almost none of its examples: it cannot
  #                                    recognise the label) is not flagged (skip), or is left to the transfer test
  #                                    (transfer; needs relearned_draws > 0; docs/defense.md, session 40).
  c.abl.relearned_doubted = "keep"  # relearned_at: a flagged label's examples the judge neither backs nor rejects
  #                                  (disown_below to own_above) that fine-tuning has learned (relearned_above)
  #                                  keep training with their label (keep) or are left out for the rest (drop).
  c.abl.relearned_then = "restart"  # relearned_at, where a label is flagged: fine-tuning starts again from the
  #                                   isolation model for finetune_epochs (restart; the check's epochs are the cost)
  #                                   or goes on (continue), which leaves most of a learned backdoor in 2 epochs.
  c.abl.own_above = 0.5  # distill: pool examples whose label the gauge gives at least this train with their label
  #                       (one-hot); in (disown_below, 1], 1 = off (session 9's default: every pool example
  #                       trains toward the gauge's probabilities); 0.5: the gauge backs the label over all others.
  c.abl.unsure = "drop"  # distill: pool examples neither owned (own_above) nor disowned (disown_below) stay out of
  #                        fine-tuning (drop) or train toward the gauge's probabilities (distill, session 9's default).
  c.abl.relabel_confidence = 0.0  # relabel: the judge's least probability for a new label, in [0, 1].
  c.abl.unlearning_epochs = 0  # Epochs of unlearning the isolated examples (the paper: 5).
  c.abl.unlearning_lr = 5e-4  # Constant SGD learning rate of unlearning.
  c.abl.unlearning_batch_size = 64  # Batch size of unlearning (the isolated set is small).
  # Unlearning, where it runs, defaults to the mode that beat the paper's on BadNets, Blend and SIG
  # (docs/unlearning.md); the paper's own: unlearning_mode=ascent, unlearning_loss=neg_ce, joint_exclude_ratio=0.
  c.abl.unlearning_mode = "joint"  # ascent (the paper: isolated only) or joint (also +CE on retained).
  c.abl.unlearning_loss = "complement"  # On isolated examples: neg_ce (the paper: -CE) or complement
  #                                   (-log(1 - p(label)): strong while p is high, fading as p -> 0).
  c.abl.joint_weight = 1.0  # joint: weight of the retained examples' cross-entropy.
  c.abl.joint_batch_size = 128  # joint: retained examples paired with each batch of isolated ones.
  c.abl.joint_exclude_ratio = 0.2  # joint: leave the lowest-loss share (isolation scores) out of the
  #                                  descent, i.e. the backdoor examples isolation missed; <= ratio: none.
  c.abl.unlearning_bn = "train"  # BatchNorm in unlearning: train (batch stats, updated) or frozen (kept).
  c.abl.unlearning_stop = "none"  # none; isolated_accuracy: stop once accuracy on the isolated set is at
  #                                 most stop_accuracy; retained_accuracy: once it is at most the accuracy
  #                                 on retained examples of the same labels + stop_accuracy. Checked before
  #                                 the first epoch too: a model that no longer fits them unlearns nothing.
  c.abl.stop_accuracy = 0.0  # The rule's threshold (the defender's rule: no test ASR, no ground truth).
  c.abl.start_from = ""  # Workdir of a run differing only in abl.unlearning_*/joint_*/stop_*: reuse its
  #                        isolation and fine-tuned model, and run only this config's unlearning.

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 100  # Epochs of the no-defense / clean baselines.
  c.train.batch_size = 128  # Global batch, split over local devices.
  c.train.learning_rate = 0.1  # Peak SGD learning rate (baselines).
  c.train.schedule = "cosine"  # Baseline lr schedule: cosine, step (x0.1 at lr_boundaries) or constant.
  c.train.lr_boundaries = (50, 75)  # Epochs where the step schedule drops the lr 10x.
  c.train.momentum = 0.9  # SGD momentum, every phase.
  c.train.weight_decay = 5e-4  # L2 weight decay, every phase (ABL code uses 1e-4 for WRN-16-1).
  c.train.label_smoothing = 0.0  # In [0, 1): smoothing of the cross-entropy of ordinary training (baselines
  #                                and fine-tuning); isolation, its scores and unlearning use plain CE.
  c.train.dtype = "auto"  # Activations: float32, bfloat16 (parameters, optimizer and BatchNorm statistics
  #                        stay float32), or auto = bfloat16 on GPU/TPU, float32 on CPU.
  c.train.augment = True  # Random crop (pad 4) + horizontal flip, on device (not in isolation).
  c.train.eval_batch_size = 500  # Batch size of evaluation and loss scoring.
  c.train.eval_every_epochs = 1  # Evaluate CA/ASR every this many epochs of every phase (0 = only at the end,
  #                                on the full test set); the unlearning curve has a point per evaluation.
  c.train.epoch_eval_size = 0  # Test images used by the per-epoch evaluation (0 = all; the end uses all).
  c.train.log_every_steps = 50  # Print loss, images/s and ETA every this many steps.
  c.train.keep_checkpoints = 2  # Orbax checkpoints kept in WORKDIR/checkpoints.

  # Multi-process data parallelism (docs/multihost.md). Not part of the experiment: a workdir's run may
  # resume with another process count, so check_same_config ignores this group.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"  # auto (join a job when an address or a cluster is found), always, never.
  c.distributed.coordinator_address = ""  # host:port of process 0; '' = from the environment / auto-detection.
  c.distributed.num_processes = 0  # Processes in the job; 0 = from the environment.
  c.distributed.process_id = -1  # This process's index; -1 = from the environment.
  return c


def add_clean_label(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the clean-label attack's fields (full-size defaults) to `c.attack`; configs/abl_clean_label.py uses it.

  Kept out of base_config so that the config.json of runs of the other attacks stays as it was.
  Every size below is on the 0..255 pixel scale (L-inf eps 8 = 8/255).
  """
  a = c.attack
  a.trigger_style = "corner"  # clean_label: the BadNets 3x3 grid bottom-right ('corner') or in all four corners.
  a.trigger_amplitude = 0.0  # clean_label: 0 = overwrite with the grid; > 0 = add +/- this much instead (clipped).
  a.pgd = ml_collections.ConfigDict()
  a.pgd.norm = "linf"  # PGD norm: linf or l2.
  a.pgd.eps = 8.0  # Radius of the ball (linf 8 = 8/255; the seed's l2 figures use 300, 600, 1200).
  a.pgd.step = 1.5  # Step size: linf moves every pixel by this; l2 moves by this length.
  a.pgd.steps = 100  # Number of PGD steps (the reference re-implementations' 100).
  a.pgd.random_start = False  # Start from a random point in the ball instead of the image.
  a.pgd.batch_size = 512  # Images per PGD call, split over the local devices.
  a.surrogate = ml_collections.ConfigDict()
  a.surrogate.model = "resnet18"  # Surrogate architecture (config.model names); trained on the clean set.
  a.surrogate.width = 0  # Its base width; 0 = the model's default.
  a.surrogate.epochs = 30  # Training epochs (cosine lr); the trained surrogate is cached by its config.
  a.surrogate.batch_size = 128  # Training batch, split over the local devices.
  a.surrogate.lr = 0.1  # Peak SGD learning rate (momentum is config.train.momentum).
  a.surrogate.weight_decay = 5e-4  # L2 weight decay.
  a.surrogate.augment = True  # Random crop + flip during its training.
  a.surrogate.adversarial = True  # PGD adversarial training (the reference attack's surrogate) or standard.
  a.surrogate.adv_eps = 8.0  # Adversarial training: L-inf radius...
  a.surrogate.adv_step = 2.0  # ...step size...
  a.surrogate.adv_steps = 7  # ...and steps (random start) of its PGD examples.
  return c


def add_input_aware(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the input-aware attack's fields c.attack.input_aware.* (full-size defaults); see abl_input_aware.py.

  Kept out of base_config so that the config.json of runs of the other attacks stays as it was.
  """
  ia = c.attack.input_aware = ml_collections.ConfigDict()
  ia.cross_rate = 0.1  # Materialised set: share of the WHOLE set given another image's trigger, labels kept.
  ia.p_attack = 0.1  # Attacker's training: share of each batch made backdoor examples (target label).
  ia.p_cross = 0.1  # Attacker's training: share of each batch made cross-trigger examples (true labels).
  ia.generator_width = 32  # Width of G's and M's first stage (32 -> 32-64-128, the published CIFAR-10 shape).
  ia.generator_depth = 3  # Down/up-sampling stages of G and M (image side must be divisible by 2**depth).
  ia.mask_epochs = 25  # Stage 1: epochs of the mask generator alone (the reference's 25).
  ia.mask_lr = 0.01  # Stage 1: Adam lr (betas 0.5, 0.9), x0.1 at 40% and 80% of the epochs.
  ia.mask_density = 0.032  # Stage 1: the density loss mean(relu(m - mask_density)) ...
  ia.lambda_norm = 100.0  # ... and its weight.
  ia.lambda_div = 1.0  # Weight of the diversity losses (mask in stage 1, pattern in stage 2).
  ia.epochs = 100  # Stage 2: epochs of classifier + pattern generator (the reference runs 1000).
  ia.classifier = ""  # Attacker's classifier (a config.model name); '' = config.model.name.
  ia.classifier_width = 0  # Its base width; 0 = config.model.width.
  ia.classifier_lr = 0.01  # Stage 2: classifier SGD lr (cosine; momentum config.train.momentum).
  ia.generator_lr = 0.01  # Stage 2: pattern generator Adam lr (cosine; betas 0.5, 0.9).
  ia.weight_decay = 5e-4  # Stage 2: the classifier's L2 weight decay.
  ia.batch_size = 128  # Pairs per step in both stages (global; split over the local devices).
  ia.augment = True  # Random crop (pad 4) + flip of the attacker's training images, on device.
  return c


def add_wanet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds WaNet's fields c.attack.wanet.* (the reference code's defaults); configs/abl_wanet.py uses it.

  Kept out of base_config so that the config.json of runs of the other attacks stays as it was. The warping
  field itself comes from config.seed (the 'poison' key).
  """
  w = c.attack.wanet = ml_collections.ConfigDict()
  w.k = 4  # Control points per side of the random grid that is upsampled (bicubic) to the image (>= 2).
  w.s = 0.5  # Strength: the field moves pixels by s * noise / H in [-1, 1] grid units (>= 0).
  w.grid_rescale = 1.0  # The reference's grid_rescale: the warped grid is scaled by this, in (0, 1].
  w.cross_ratio = 2.0  # Noise-mode examples (field + random jitter, labels kept) per warped example (>= 0).
  return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Shrinks `c` in place for the 'cpu' or 'smoke' variant."""
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is unknown; allowed: {', '.join(repr(v) for v in VARIANTS)}")
  if variant in CPU_VARIANTS:
    c.data.source = "folder"
    c.data.path = SHARED_CIFAR10
    c.data.train_size = 10_000
    c.model.name = "small_cnn"
    c.model.width = 16
    c.train.batch_size = 128
    c.train.weight_decay = 1e-4
    c.train.epochs = 8
    # Measured: with crop+flip, 8 epochs of the small CNN leave BadNets at ASR 0.16 (the moved trigger
    # needs a longer schedule), so this short schedule trains without augmentation.
    c.train.augment = False
    c.train.log_every_steps = 20
    c.train.epoch_eval_size = 2000
    # Measured: on 2 CPU cores the small CNN's inference passes (the defense's scoring, the evaluations) run
    # 1.2x faster in batches of 250 than of 500, with identical outputs (docs/defense.md, session 24).
    c.train.eval_batch_size = 250
    # 5 LGA epochs, the pool ranked over the last 3: the small CNN ranks the 1% SIG poison lowest after 3
    # epochs on one seed and after 5 on another (docs/defense.md); 5 + 4 epochs, the gauge's 6 x 0.8 at 16x16
    # (a step there takes a third to a quarter of a full one's time), and 3 scoring passes against 8 epochs
    # without defense.
    c.abl.isolation_epochs = 5
    # The gauges at 16x16 for 6 epochs cost less than 3 at 32x32, and on the table's 18 runs they keep a flagged
    # label's own class closer to no defense (docs/defense.md, sessions 31-32). The full-size default keeps
    # full-resolution gauges: not measured there.
    c.abl.gauge_epochs = 6
    c.abl.gauge_downsample = 2
    c.abl.finetune_epochs = 4
    c.abl.finetune_lr_boundaries = (3, 100)
  if variant == "fast":
    # After KellerJordan/cifar10-airbench's airbench94, in what this trainer has (plain SGD, momentum 0.9):
    # its architecture with the widths of the small CNN's cost per step, label smoothing 0.2, and weight
    # decay 1.5e-3 at lr 0.1, about its decay per example. Left out: its Nesterov momentum and lr shape,
    # lookahead, flip/translate augmentation and flip test-time augmentation (docs/benchmarks.md).
    c.model.name = "airbench"
    c.model.width = 16
    c.train.label_smoothing = 0.2
    c.train.weight_decay = 1.5e-3
    c.train.epochs = 10
  elif variant == "smoke":
    c.data.source = "synthetic"
    c.data.synthetic_train_size = 1024
    c.data.synthetic_test_size = 256
    c.model.name = "small_cnn"
    c.model.width = 8
    c.train.batch_size = 64
    c.train.eval_batch_size = 128
    c.train.epochs = 6
    c.train.augment = False  # A shifted or mirrored trigger needs more steps than a smoke run has.
    c.train.log_every_steps = 4
    c.abl.isolation_epochs = 2
    c.abl.isolation_ratio = 0.05
    c.abl.gauge_epochs = 2
    c.abl.finetune_epochs = 2
    c.abl.finetune_lr_boundaries = (100, 200)
    c.abl.unlearning_lr = 0.02
    c.abl.unlearning_batch_size = 32
  return c
