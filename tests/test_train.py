"""The trainer's steps: augmentation, 1-device == 2-device, batching, prediction, NaN stop, checkpoints."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from abl_jax import abl, train
from abl_jax.checkpoint import CheckpointMismatchError, Checkpointer

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class Tiny(nn.Module):
  """A conv + BatchNorm + dense net, enough to exercise gradients and batch statistics."""
  features: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


def _data(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, (n,)).astype(np.int32)


def _state(model=None, lr=0.1):
  model = model or Tiny()
  return train.create_train_state(model, train.sgd(lr, 0.9, 5e-4), jax.random.PRNGKey(0), (8, 8, 3))


def _make(loss_fn, **kwargs):
  """A train step of the tiny model with _state()'s optimizer."""
  return train.make_train_step(Tiny(), loss_fn, MEAN, STD, momentum=0.9, weight_decay=5e-4, **kwargs)


LR = np.float32(0.1)  # The learning rate of _state()'s optimizer, a step's last argument.


def _steps(num_devices, loss_fn, augment_data, steps=3, mix_mode="none"):
  """Runs `steps` training steps with the global batch split over `num_devices` devices."""
  mesh = train.make_mesh(jax.local_devices()[:num_devices])
  step = _make(loss_fn, augment_data=augment_data, mix_mode=mix_mode, mesh=mesh)
  images, labels = _data()
  state = train.replicate(_state(), mesh)
  for i in range(steps):
    x, y = train.put_batch(images, mesh), train.put_batch(labels, mesh)
    assert len(x.sharding.device_set) == num_devices
    state, metrics = step(state, x, y, train.replicate(jax.random.PRNGKey(i), mesh), train.replicate(LR, mesh))
  return train.to_host(state), train.to_host(metrics)


@pytest.mark.parametrize("loss_name, mix_mode", [("ce", "none"), ("lga", "none"), ("unlearn", "none"),
                                                 ("ce", "cutmix")])
def test_two_devices_equal_one_device(loss_name, mix_mode):
  loss_fn = {"ce": abl.cross_entropy_loss, "lga": abl.isolation_loss("lga", 1.05),
             "unlearn": abl.neg_ce_loss}[loss_name]
  one_state, one_metrics = _steps(1, loss_fn, augment_data=True, mix_mode=mix_mode)
  two_state, two_metrics = _steps(2, loss_fn, augment_data=True, mix_mode=mix_mode)
  for a, b in zip(jax.tree.leaves((one_state.params, one_state.batch_stats)),
                  jax.tree.leaves((two_state.params, two_state.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(one_metrics["loss"], two_metrics["loss"], rtol=1e-4)
  # The steps really moved the weights (the comparison above is not vacuous).
  assert not np.allclose(jax.tree.leaves(one_state.params)[0], jax.tree.leaves(_state().params)[0])


def test_augment_is_a_shifted_crop_or_its_mirror():
  images = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  out = np.asarray(train.augment(jnp.asarray(images), keys))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for img, pad in zip(out, padded):
    crops = [pad[dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
    assert any(np.array_equal(img, c) or np.array_equal(img, c[:, ::-1]) for c in crops)
  np.testing.assert_array_equal(out, train.augment(jnp.asarray(images), keys))


def test_cutmix_pastes_a_box_of_the_next_image_and_mixup_blends_it():
  images = jnp.stack([jnp.full((8, 8, 3), 10 * (i + 1), jnp.uint8) for i in range(5)])
  keys = train.example_keys(jax.random.PRNGKey(0), 5)
  out, lam = train.mix(images, keys, "cutmix", 1.0)
  out, lam = np.asarray(out), np.asarray(lam)
  pasted_somewhere = False
  for i in range(5):
    own, other = 10 * (i + 1), 10 * ((i + 1) % 5 + 1)
    pasted = out[i, :, :, 0] == other
    assert np.all(pasted | (out[i, :, :, 0] == own)) and np.all(out[i] == out[i, :, :, :1])
    rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
    if len(rows):  # One axis-aligned box, and the image's share of the loss is the share of its own pixels.
      assert pasted[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and pasted.sum() == len(rows) * len(cols)
      pasted_somewhere = True
    assert lam[i] == pytest.approx(1 - pasted.mean())
  assert pasted_somewhere
  blended, share = train.mix(images, keys, "mixup", 1.0)
  expected = share[:, None, None, None] * images + (1 - share[:, None, None, None]) * jnp.roll(images, -1, axis=0)
  np.testing.assert_allclose(blended, expected, rtol=1e-6)
  assert np.all((np.asarray(share) > 0) & (np.asarray(share) < 1)) and len(np.unique(share)) == 5
  with pytest.raises(ValueError, match="mix mode 'cutout' is unknown; allowed: cutmix, mixup"):
    train.mix(images, keys, "cutout", 1.0)


def test_a_mixed_step_splits_the_loss_between_both_labels():
  images, labels = _data(n=8)
  state, key = _state(), jax.random.PRNGKey(4)
  mixed, lam = train.mix(jnp.asarray(images), train.example_keys(jax.random.fold_in(key, 1), 8), "cutmix", 1.0)
  logits, _ = Tiny().apply(train.variables_of(state), train.preprocess(mixed, MEAN, STD), train=True,
                           mutable=["batch_stats"])
  log_p = np.asarray(jax.nn.log_softmax(logits))
  expected = -np.mean(lam * log_p[np.arange(8), labels] + (1 - lam) * log_p[np.arange(8), np.roll(labels, -1)])
  step = _make(abl.cross_entropy_loss, augment_data=False, mix_mode="cutmix")
  _, metrics = step(train.replicate(state), train.put_batch(images), train.put_batch(labels), train.replicate(key), LR)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  plain = _make(abl.cross_entropy_loss, augment_data=False)
  _, unmixed = plain(train.replicate(_state()), train.put_batch(images), train.put_batch(labels), train.replicate(key),
                     LR)
  assert not np.isclose(unmixed["loss"], expected)


def test_a_small_loss_step_trains_on_the_lower_losses_of_the_batch():
  images, labels = _data(n=8)
  state, key = _state(), jax.random.PRNGKey(4)
  logits, _ = Tiny().apply(train.variables_of(state), train.preprocess(jnp.asarray(images), MEAN, STD), train=True,
                           mutable=["batch_stats"])
  ce = -np.asarray(jax.nn.log_softmax(logits))[np.arange(8), labels]
  step = _make(abl.SmallLoss(0.25, label_cap=1.0), augment_data=False)
  _, metrics = step(train.replicate(state), train.put_batch(images), train.put_batch(labels), train.replicate(key), LR)
  np.testing.assert_allclose(metrics["loss"], np.sort(ce)[:6].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ce"], ce.mean(), rtol=1e-5)
  capped = _make(abl.SmallLoss(0.25, label_cap=0.0), augment_data=False)
  _, metrics = capped(train.replicate(_state()), train.put_batch(images), train.put_batch(labels), train.replicate(key),
                      LR)
  np.testing.assert_allclose(metrics["loss"], ce.mean(), rtol=1e-5)  # The labels reach the loss.


def test_epoch_order_covers_every_example_in_whole_batches():
  order = train.epoch_order(10, 4, jax.random.PRNGKey(0))
  assert order.shape == (3, 4)
  assert set(order.ravel()) == set(range(10))
  np.testing.assert_array_equal(order, train.epoch_order(10, 4, jax.random.PRNGKey(0)))
  assert train.epoch_order(3, 8, jax.random.PRNGKey(0)).shape == (1, 8)  # Tiny sets wrap around.


def test_predict_pads_the_last_batch_and_matches_direct_apply():
  images, labels = _data(n=11)
  model, state = Tiny(), _state()
  ce, pred = train.predictor(model, train.variables_of(state), MEAN, STD, batch_size=4)(images, labels)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       train.preprocess(jnp.asarray(images), MEAN, STD), train=False)
  assert ce.shape == pred.shape == (11,)
  np.testing.assert_array_equal(pred, np.argmax(logits, -1))
  np.testing.assert_allclose(ce, -jax.nn.log_softmax(logits)[np.arange(11), labels], rtol=1e-5)


def test_predict_outputs_do_not_depend_on_the_batch_size():
  # The cpu variants score in batches of 250, not 500 (faster on CPU); their results rest on this.
  images, labels = _data(n=12)
  model, variables = Tiny(), train.variables_of(_state())
  outputs = [train.predictor(model, variables, MEAN, STD, batch_size=b, probabilities=True)(images, labels)
             for b in (4, 6, 12)]
  for other in outputs[1:]:
    for a, b in zip(outputs[0], other):
      np.testing.assert_array_equal(a, b)


def test_inference_program_holds_no_collective():
  # An all-gather in back-to-back independent calls deadlocked 2 simulated CPU devices (XLA's rendezvous abort).
  images, labels = _data(n=8)
  model, state = Tiny(), _state()
  mesh = train.default_mesh()
  assert mesh.size == 2
  fn = train._infer_step(model, tuple(MEAN), tuple(STD), mesh)
  hlo = fn.lower(train.replicate(train.variables_of(state), mesh), train.put_batch(images, mesh),
                 train.put_batch(labels, mesh)).compile().as_text()
  assert not any(op in hlo for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all"))


def test_nan_loss_stops_with_a_clear_message():
  images, labels = _data()
  nan_loss = lambda ce: jnp.mean(ce) * jnp.nan
  step = _make(nan_loss, augment_data=False)
  with pytest.raises(FloatingPointError, match="isolation epoch 1: loss became nan at step 1"):
    train.run_epoch(step, train.replicate(_state()), images, labels, train.epoch_order(16, 8, jax.random.PRNGKey(0)),
                    jax.random.PRNGKey(1), learning_rate=0.1, log_every=1, describe="isolation epoch 1")


def test_batch_size_must_split_over_devices():
  with pytest.raises(ValueError, match=r"config\.train\.batch_size=3 must be a positive multiple of the 2"):
    train.check_batch_size(3, "config.train.batch_size")


def test_checkpoint_round_trip_and_mismatch(tmp_path):
  state = _state()
  state = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(3, state, {"phase": "finetune", "epoch": 2})
  assert ckpt.latest() == 3
  restored, meta = ckpt.restore(3, like=_state())
  assert meta == {"phase": "finetune", "epoch": 2}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(CheckpointMismatchError, match="config.model"):
    ckpt.restore(3, like=_state(Tiny(features=5)))


def test_xla_flags_keep_a_users_ynn_setting():
  from abl_jax import xla_flags
  new = (0, 10, 2)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.prefer_xla_cpu_convolutions(env, new) == (
      "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=")
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}
  assert xla_flags.prefer_xla_cpu_convolutions(mine, new) == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
  assert xla_flags.prefer_xla_cpu_convolutions({}, new) == "--xla_cpu_experimental_ynn_fusion_type="
  assert xla_flags.prefer_xla_cpu_convolutions({"ABL_JAX_KEEP_YNNPACK": "1"}, new) == ""
  # An older jaxlib would abort on the unknown flag.
  assert xla_flags.prefer_xla_cpu_convolutions({}, (0, 8, 0)) == ""
  assert xla_flags._jaxlib_version() >= (0, 4, 30)


def test_compilation_cache_goes_under_the_cache_root_unless_the_user_says(tmp_path, monkeypatch):
  from abl_jax import xla_flags
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  env = {}
  assert xla_flags.use_compilation_cache(env) == str(tmp_path / "abl_jax" / "xla")
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "abl_jax" / "xla")
  mine = {"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}
  assert xla_flags.use_compilation_cache(mine) == "/elsewhere"
  off = {"ABL_JAX_NO_COMPILATION_CACHE": "1"}
  assert xla_flags.use_compilation_cache(off) == "" and "JAX_COMPILATION_CACHE_DIR" not in off



def test_every_phase_optimizer_has_one_state_structure():
  # A checkpoint is restored into a state built with a placeholder optimizer, whatever phase wrote it.
  params = _state().params
  structures = {str(jax.tree.structure(train.sgd(lr, 0.9, 5e-4).init(params)))
                for lr in (0.0, 0.1, optax.cosine_decay_schedule(0.1, 10),
                           optax.piecewise_constant_schedule(0.1, {5: 0.1}))}
  assert len(structures) == 1


def test_the_step_takes_the_rate_and_run_epoch_gives_it_the_schedules_rate_at_the_optimizers_count():
  images, labels = _data()
  step = _make(abl.cross_entropy_loss, augment_data=False)
  args = (train.put_batch(images), train.put_batch(labels), train.replicate(jax.random.PRNGKey(0)))
  before = jax.device_get(_state())  # Host copies: the step donates its state.
  stepped = {lr: train.to_host(step(train.replicate(before), *args, np.float32(lr))[0]) for lr in (0.1, 0.2)}
  moved = {lr: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s.params, before.params)
           for lr, s in stepped.items()}
  for a, b in zip(jax.tree.leaves(moved[0.1]), jax.tree.leaves(moved[0.2])):  # sgd's first step: -lr (g + wd w).
    np.testing.assert_allclose(2 * a, b, rtol=1e-4, atol=2e-7)  # Float32 weights minus their old values.
  assert any(np.abs(a).max() > 0 for a in jax.tree.leaves(moved[0.1]))
  schedule = lambda count: jnp.where(jnp.asarray(count) >= 5, 0.1, 0.0)  # A step moves from count 5 on.
  np.testing.assert_array_equal(train.learning_rates(schedule, 3, 4), np.float32([0, 0, 0.1, 0.1]))
  np.testing.assert_array_equal(train.learning_rates(0.5, 7, 2), np.float32([0.5, 0.5]))
  order = train.epoch_order(16, 8, jax.random.PRNGKey(0))  # Two steps.
  for count, moves in ((3, False), (4, True)):
    state = train.replicate(before.replace(step=jnp.int32(count)))
    after, _ = train.run_epoch(step, state, images, labels, order, jax.random.PRNGKey(1), learning_rate=schedule,
                               log_every=2, describe="epoch")
    after = train.to_host(after)
    assert int(after.step) == count + 2
    changed = any(np.any(a != b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params)))
    assert changed == moves, count


def test_module_docstring_example_runs():
  model, (images, labels) = Tiny(), _data()
  tx, key, image_shape, mean, std = train.sgd(0.1, 0.9, 5e-4), jax.random.PRNGKey(0), (8, 8, 3), MEAN, STD
  order = train.epoch_order(len(images), 8, key)
  mesh = train.make_mesh()
  state = train.replicate(train.create_train_state(model, tx, key, image_shape), mesh)
  schedule = optax.cosine_decay_schedule(0.1, 2)
  step = train.make_train_step(model, abl.cross_entropy_loss, mean, std, momentum=0.9, weight_decay=5e-4,
                               augment_data=True, mesh=mesh)
  state, summary = train.run_epoch(step, state, images, labels, order, key, learning_rate=schedule, log_every=50,
                                   describe="epoch 1")
  ce, pred = train.predictor(model, train.variables_of(state), mean, std, batch_size=8)(images, labels)
  assert ce.shape == pred.shape == (16,) and summary["images_per_s"] > 0 and int(train.to_host(state).step) == 2


def test_add_triggers_gives_each_chosen_image_another_classes_trigger_and_keeps_the_rest():
  classes, n = 4, 400
  triggers = np.zeros((classes, 2, 2, 1), np.float32)
  for k in range(classes):
    triggers[k, 0, 0, 0] = 10.0 * (k + 1)  # Class k's trigger adds 10 (k + 1) to one pixel.
  triggers[3, 1, 1, 0] = -50.0  # and class 3's also darkens another, clipped at 0.
  images = np.full((n, 2, 2, 1), 20, np.uint8)
  labels = np.arange(n, dtype=np.int32) % classes
  keys = train.example_keys(jax.random.PRNGKey(0), n)
  out = np.asarray(train.add_triggers(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(triggers), 0.5, keys))
  changed = out[:, 0, 0, 0] != 20
  added = (out[changed, 0, 0, 0] - 20) / 10 - 1  # The class whose trigger each changed image got.
  assert 0.4 < changed.mean() < 0.6
  assert np.all(added != labels[changed]) and set(added.astype(int)) == set(range(classes))  # Never its own.
  np.testing.assert_array_equal(out[changed, 1, 1, 0], np.where(added == 3, 0, 20))
  np.testing.assert_array_equal(out[~changed], images[~changed])
  assert out.dtype == np.float32
  none = train.add_triggers(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(triggers), 0.0, keys)
  np.testing.assert_array_equal(none, images)
  fixed = train.add_triggers(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(triggers), 0.5, keys, (1.0, 1.0))
  np.testing.assert_array_equal(fixed, out)


def test_add_triggers_with_two_candidates_per_class_draws_either_of_another_classes():
  classes, n = 3, 600
  triggers = np.zeros((2, classes, 1, 1, 1), np.float32)
  for j in range(2):
    for k in range(classes):
      triggers[j, k, 0, 0, 0] = 10.0 * (k + 1) + 40.0 * j  # Candidate j of class k adds 10 (k + 1) + 40 j.
  images = np.full((n, 1, 1, 1), 50, np.uint8)
  labels = np.arange(n, dtype=np.int32) % classes
  keys = train.example_keys(jax.random.PRNGKey(3), n)
  out = np.asarray(train.add_triggers(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(triggers), 0.5,
                                      keys, (1.0, 1.0)))[:, 0, 0, 0]
  changed = out != 50
  added = out[changed] - 50
  which, owner = (added > 35).astype(int), ((added - 40 * (added > 35)) / 10 - 1).astype(int)
  assert 0.4 < changed.mean() < 0.6 and 0.4 < which.mean() < 0.6  # Either candidate, about equally often.
  assert np.all(owner != labels[changed]) and set(owner) == set(range(classes))
  single = np.asarray(train.add_triggers(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(triggers[0]), 0.5,
                                         keys, (1.0, 1.0)))[:, 0, 0, 0]
  np.testing.assert_array_equal(single != 50, changed)  # The same images and classes: the pick has its own key.
  np.testing.assert_array_equal(single[changed], out[changed] - 40 * which)


def test_add_triggers_scales_each_added_trigger_by_a_factor_from_the_range():
  classes, n = 2, 2000
  triggers = np.zeros((classes, 1, 1, 1), np.float32)
  triggers[:, 0, 0, 0] = 40.0  # Either class's trigger adds 40 times the factor to the single pixel.
  images = np.full((n, 1, 1, 1), 100, np.uint8)
  labels = np.arange(n, dtype=np.int32) % classes
  keys = train.example_keys(jax.random.PRNGKey(1), n)
  plain = np.asarray(train.add_triggers(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(triggers), 0.5, keys))
  out = np.asarray(train.add_triggers(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(triggers), 0.5, keys,
                                      (0.5, 2.0)))[:, 0, 0, 0]
  changed = plain[:, 0, 0, 0] != 100
  np.testing.assert_array_equal(out != 100, changed)  # The same images get one: the factor has a key of its own.
  factors = (out[changed] - 100) / 40
  assert factors.min() >= 0.5 - 1 / 80 and factors.max() <= 2.0 + 1 / 80  # Rounded to whole pixel levels.
  assert factors.min() < 0.6 and factors.max() > 1.9 and abs(factors.mean() - 1.25) < 0.05  # Uniform over it.
  doubled = np.asarray(train.add_triggers(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(triggers), 0.5,
                                          keys, (2.0, 2.0)))[:, 0, 0, 0]
  np.testing.assert_array_equal(doubled[changed], 180)
