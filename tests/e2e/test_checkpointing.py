"""Checkpointer: exact round trip, cadences, unreadable fallback, digests, failed writes,
architecture refusal."""

import errno
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.training import checkpointing
from diffusion_jax.training import digests
from diffusion_jax.training import params_checkpoint
from diffusion_jax import config_base
from diffusion_jax.training import optimizer
from diffusion_jax.training import run_setup
from diffusion_jax import sharding
from diffusion_jax.training import train
from diffusion_jax.training import train_state as ts
import training_testlib


def _config():
  return config_base.shrink(config_base.get_base_config())


def _state(seed, config):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
  tx = optimizer.make_optimizer(config.optim)
  state = ts.create_train_state(params, tx)
  grads = jax.tree_util.tree_map(lambda p: p * 0.5 + 1.0, params)
  for _ in range(seed + 1):
    state = ts.apply_gradients(state, grads, tx, 0.9)
  return state


def _abstract(state, mesh):
  rep = sharding.replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)


def _assert_equal_trees(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tree_listing(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      st = os.stat(p)
      out[p] = (st.st_size, st.st_mtime_ns)
  return out


def test_round_trip_cadence_and_snapshots(tmp_path):
  config = _config()
  mesh = sharding.make_mesh()
  ckpt = checkpointing.Checkpointer(str(tmp_path), config, max_to_keep=2)
  states = {s: _state(s, config) for s in (1, 2, 3, 4)}
  for s, st in states.items():
    ckpt.save(s, sharding.replicate(st, mesh), snapshot=(s == 2))
  ckpt.wait()
  assert [s for s, _ in checkpointing.list_steps(str(tmp_path))] == [4, 3, 2]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]  # max_to_keep=2
  assert "2" in os.listdir(tmp_path / "snapshots")  # snapshots are kept
  restored, step = ckpt.restore(_abstract(states[4], mesh))
  assert step == 4
  _assert_equal_trees(restored, states[4])
  assert restored.params["dense"]["kernel"].sharding.is_equivalent_to(
      sharding.replicated(mesh), 2)
  restored2, step2 = ckpt.restore(_abstract(states[2], mesh), step=2)
  assert step2 == 2
  _assert_equal_trees(restored2, states[2])
  with pytest.raises(FileNotFoundError, match="available"):
    ckpt.restore(_abstract(states[2], mesh), step=1)
  saved = checkpointing.read_checkpoint_config(str(tmp_path), 4, "checkpoints")
  assert saved["model"]["ch"] == config.model.ch
  ckpt.close()


def test_unreadable_latest_falls_back_and_is_moved_aside(tmp_path, caplog):
  config = _config()
  mesh = sharding.make_mesh()
  ckpt = checkpointing.Checkpointer(str(tmp_path), config, max_to_keep=3)
  s1, s2 = _state(1, config), _state(2, config)
  ckpt.save(1, sharding.replicate(s1, mesh))
  ckpt.save(2, sharding.replicate(s2, mesh))
  ckpt.wait()
  # Corrupt every file of the newest checkpoint's state.
  for d, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
    for f in files:
      with open(os.path.join(d, f), "wb") as fh:
        fh.write(b"\x00garbage")
  with caplog.at_level("WARNING"):
    restored, step = ckpt.restore(_abstract(s1, mesh))
  assert step == 1
  _assert_equal_trees(restored, s1)
  text = caplog.text
  assert "unreadable" in text and "Falling back to checkpoint checkpoints/1" in text
  moved = os.listdir(tmp_path / "unreadable_checkpoints")
  assert len(moved) == 1 and moved[0].startswith("checkpoints_2_")
  # The step can be written again after the fallback.
  ckpt.save(2, sharding.replicate(s2, mesh))
  ckpt.wait()
  restored, step = ckpt.restore(_abstract(s2, mesh))
  assert step == 2
  _assert_equal_trees(restored, s2)
  # Nothing readable at all: a clear error instead of a silent fresh start.
  for sub in ("1", "2"):
    for d, _, files in os.walk(tmp_path / "checkpoints" / sub / "state"):
      for f in files:
        with open(os.path.join(d, f), "wb") as fh:
          fh.write(b"\x00")
  with pytest.raises(checkpointing.UnreadableCheckpoints,
                     match="No checkpoint .* could be read"):
    ckpt.restore(_abstract(s2, mesh))
  ckpt.close()


def test_architecture_mismatch_is_refused_without_touching_workdir(tmp_path):
  config = _config()
  mesh = sharding.make_mesh()
  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  ckpt.save(3, sharding.replicate(_state(0, config), mesh))
  ckpt.close()
  checkpointing.check_architecture(str(tmp_path), config)  # Same architecture: fine.
  other = _config()
  other.model.dropout = 0.3  # Not architecture.
  other.model.dtype = "bfloat16"
  other.model.remat = True
  other.training.batch_size = 64
  checkpointing.check_architecture(str(tmp_path), other)
  before = _tree_listing(tmp_path)
  for field, value in (("model.ch", 64), ("data.channels", 1),
                       ("diffusion.model_var_type (learned)", "learned")):
    bad = _config()
    section, name = field.split(" ")[0].split(".")
    bad[section][name] = value
    with pytest.raises(ValueError, match="different architecture") as err:
      checkpointing.check_architecture(str(tmp_path), bad)
    assert field in str(err.value)
  assert _tree_listing(tmp_path) == before


@pytest.fixture(scope="module")
def _cache(tmp_path_factory):
  training_testlib.enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
  yield
  training_testlib.disable_compilation_cache()


def test_params_checkpoint_for_import_and_evaluation(tmp_path, _cache):
  config = training_testlib.digits_smoke("--config.training.num_train_steps=125")
  mesh = sharding.make_mesh()
  params = jax.device_get(run_setup.init_train_state(config, mesh).params)
  ema = jax.tree_util.tree_map(lambda x: x * 0.5 + 0.25, params)
  workdir = tmp_path / "imported"
  # Parameters of another architecture are refused before anything is written.
  with pytest.raises(ValueError, match="architecture"):
    params_checkpoint.write_params_checkpoint(
        str(workdir), training_testlib.digits_smoke("--config.model.ch=16"), params)
  assert not workdir.exists()
  path = params_checkpoint.write_params_checkpoint(str(workdir), config, params,
                                               ema_params=ema, step=123)
  assert path == str(workdir / "snapshots" / "123") and os.path.isdir(path)
  assert (workdir / "config.json").exists()
  before = _tree_listing(workdir)
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    params_checkpoint.write_params_checkpoint(str(workdir), config, params)
  assert _tree_listing(workdir) == before

  got_ema, step = params_checkpoint.load_eval_params(str(workdir), config)
  got_raw, _ = params_checkpoint.load_eval_params(str(workdir), config, use_ema=False, step=123)
  assert step == 123
  _assert_equal_trees(got_ema, ema)
  _assert_equal_trees(got_raw, params)
  with pytest.raises(ValueError, match="different architecture"):
    params_checkpoint.load_eval_params(str(workdir), training_testlib.digits_smoke(
        "--config.model.ch=16"))
  with pytest.raises(FileNotFoundError):
    params_checkpoint.load_eval_params(str(tmp_path / "empty"), config)

  # Training resumes from the imported state: 2 steps from 123, EMA from the given one.
  state = jax.device_get(train.train_and_evaluate(config, str(workdir)))
  assert int(state.step) == 125
  assert int(state.opt_state[1].count) == 2  # Fresh Adam state: 2 updates so far.
  decay = config.optim.ema_decay
  leaf = lambda t: jax.tree_util.tree_leaves(t)[0]
  # After two updates the EMA is decay^2 * ema + (mixture of the new params).
  assert abs(float(np.mean(leaf(state.ema_params) - decay ** 2 * leaf(ema)))) < 0.05
  assert (workdir / "checkpoints" / "125").exists()


def _saved_digests(path):
  with open(os.path.join(path, "digests", "metadata")) as f:
    return json.load(f)


def test_digests_of_what_the_disk_returns_are_checked(tmp_path, caplog):
  """Arrays that differ from what was saved fall back like an unreadable checkpoint;
  a checkpoint without digests (older versions) restores with a note."""
  config = _config()
  mesh = sharding.make_mesh()
  ckpt = checkpointing.Checkpointer(str(tmp_path), config, max_to_keep=3,
                                    async_save=False)
  s1, s2, s3 = (_state(i, config) for i in (1, 2, 3))
  for step, state in ((1, s1), (2, s2), (3, s3)):
    ckpt.save(step, sharding.replicate(state, mesh))
  saved = _saved_digests(tmp_path / "checkpoints" / "1")
  assert saved["algorithm"] == digests.ALGORITHM
  host = jax.device_get(s1)
  # Independent of the module: BLAKE2b-128 of dtype, shape and the bytes.
  kernel = np.asarray(host.params["dense"]["kernel"])
  want = hashlib.blake2b(f"{kernel.dtype.str}{kernel.shape}".encode() + kernel.tobytes(),
                         digest_size=16).hexdigest()
  assert saved["arrays"][".params['dense']['kernel']"] == want
  assert len(saved["arrays"]) == len(jax.tree_util.tree_leaves(host))
  # Step 3's saved bytes "differ" from its digests: here its digest of the EMA bias is
  # made to disagree, as damaged bytes would.
  path = tmp_path / "checkpoints" / "3" / "digests" / "metadata"
  tampered = _saved_digests(tmp_path / "checkpoints" / "3")
  tampered["arrays"][".ema_params['dense']['bias']"] = "0" * 32
  path.write_text(json.dumps(tampered))
  # Step 2 was written by an older version: no digests at all.
  shutil.rmtree(tmp_path / "checkpoints" / "2" / "digests")
  with caplog.at_level("WARNING"):
    restored, step = ckpt.restore(_abstract(s1, mesh))
  assert step == 2
  _assert_equal_trees(restored, s2)
  text = caplog.text
  assert ("checkpoints/3" in text and "first mismatching array: .ema_params['dense']"
          "['bias']" in text), text
  assert "no array digests" in text and "checkpoints/2" in text
  moved = os.listdir(tmp_path / "unreadable_checkpoints")
  assert [m.rsplit("_", 1)[0] for m in moved] == ["checkpoints_3"]  # Only the bad one.
  ckpt.close()


def test_a_failed_write_is_raised_once_with_path_errno_and_what_is_kept(tmp_path):
  config = _config()
  mesh = sharding.make_mesh()
  ckpt = checkpointing.Checkpointer(str(tmp_path), config, max_to_keep=3)
  ckpt.save(1, sharding.replicate(_state(1, config), mesh), snapshot=True)
  ckpt.wait()
  full = os.path.join(str(tmp_path), "snapshots", "2.orbax-checkpoint-tmp", "state", "d")

  def no_space(*args, **kwargs):
    raise ValueError("writing failed") from OSError(errno.ENOSPC, "No space left on device",
                                                    full)

  ckpt._managers[checkpointing.SNAPSHOT_DIR].save = no_space  # pylint: disable=protected-access
  ckpt.save(2, sharding.replicate(_state(2, config), mesh), snapshot=True)
  with pytest.raises(checkpointing.CheckpointWriteError) as raised:
    ckpt.wait()
  message = str(raised.value)
  assert raised.value.errno == errno.ENOSPC and raised.value.filename == full
  assert message.startswith("Saving the checkpoint of step 2 failed: writing " + full)
  assert "ENOSPC" in message and "No space left on device" in message
  # The preemption copy of step 2 committed; step 1 is kept in both directories.
  assert "kept: checkpoints/2, step" in message and "rerun the same command" in message
  assert not ckpt.failed()
  ckpt.check()  # Raised once only.
  ckpt.close()
