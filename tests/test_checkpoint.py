"""har_jax.checkpoint on 8 simulated CPU devices, in temporary directories."""

import logging
import os
import pathlib
import shutil

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from har_jax import checkpoint
from har_jax.checkpoint import Checkpointer

# A failed restore can leave TensorStore reads that complete after orbax has
# closed its asyncio event loop; Python reports that as an unraisable exception.
ignore_closed_event_loop = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


class State(flax.struct.PyTreeNode):
  step: jax.Array
  params: dict
  key: jax.Array


def make_mesh(num_devices=8):
  return Mesh(np.array(jax.devices()[:num_devices]), ("data",))


def shardings_of(mesh):
  """The shardings of a `State`: the kernel split over devices, the rest whole."""
  split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  return State(step=whole, params={"kernel": split, "bias": whole}, key=whole)


def make_state(seed, mesh, key_kind="raw"):
  """A state whose every value depends on `seed`, placed on `mesh`."""
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  state = State(
      step=jnp.int32(seed),
      params={
          "kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
      },
      key=key if key_kind == "typed" else jax.random.key_data(key))
  return jax.device_put(state, shardings_of(mesh))


def abstract_of(state, mesh):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(lambda: state), shardings_of(mesh))


def assert_states_equal(actual, expected):
  to_numpy = lambda state: jax.tree.map(
      np.asarray, state.replace(key=_key_data(state.key)))
  jax.tree.map(np.testing.assert_array_equal, to_numpy(actual),
               to_numpy(expected))


def _key_data(key):
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def saved_steps(directory):
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def corrupt(step_dir, how):
  """Damages a finished checkpoint the way a failing disk or copy would."""
  if how == "delete_item":
    shutil.rmtree(pathlib.Path(step_dir, "state"))
    return
  # OCDBT keeps the array bytes in data files named by hash under `d/`.
  data_files = [p for p in pathlib.Path(step_dir).rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files, f"no array data files found under {step_dir}"
  for path in data_files:
    if how == "overwrite_data":
      path.write_bytes(b"\0" * 16)
    elif how == "truncate_data":
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
      raise ValueError(how)


@pytest.mark.parametrize("key_kind", ["raw", "typed"])
def test_round_trip_keeps_values_and_shardings(tmp_path, key_kind):
  mesh = make_mesh()
  state = make_state(7, mesh, key_kind)
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(7, state, wait=True)
  checkpointer.close()

  restored, step = Checkpointer(tmp_path).restore_latest(
      abstract_of(state, mesh))

  assert step == 7
  assert_states_equal(restored, state)
  assert restored.key.dtype == state.key.dtype
  for leaf, sharding in zip(jax.tree.leaves(restored),
                            jax.tree.leaves(shardings_of(mesh))):
    assert leaf.sharding == sharding, f"{leaf.sharding} != {sharding}"


def test_round_trip_of_numpy_scalars(tmp_path):
  whole = NamedSharding(make_mesh(), P())
  state = {"epoch": np.int32(4), "threshold": np.float32(0.75)}
  Checkpointer(tmp_path).save(1, state, wait=True)

  restored, _ = Checkpointer(tmp_path).restore_latest(
      {name: jax.ShapeDtypeStruct((), value.dtype, sharding=whole)
       for name, value in state.items()})

  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored["epoch"].sharding == whole


def test_restore_reshards_to_another_mesh(tmp_path):
  # A run may resume on fewer devices than it was saved from.
  state = make_state(3, make_mesh(8))
  Checkpointer(tmp_path).save(3, state, wait=True)

  small_mesh = make_mesh(4)
  restored, _ = Checkpointer(tmp_path).restore_latest(
      abstract_of(state, small_mesh))

  assert_states_equal(restored, state)
  assert restored.params["kernel"].sharding == NamedSharding(
      small_mesh, P("data"))


def test_keeps_only_the_newest_max_to_keep(tmp_path):
  mesh = make_mesh()
  checkpointer = Checkpointer(tmp_path, max_to_keep=2)
  for step in range(1, 6):
    checkpointer.save(step, make_state(step, mesh))
  checkpointer.close()

  assert saved_steps(tmp_path) == [4, 5]
  assert Checkpointer(tmp_path).latest_step() == 5


@pytest.mark.parametrize("async_save", [True, False])
def test_every_save_is_readable_after_close(tmp_path, async_save):
  mesh = make_mesh()
  checkpointer = Checkpointer(tmp_path, max_to_keep=10, async_save=async_save)
  for step in range(1, 5):
    checkpointer.save(step, make_state(step, mesh))
  checkpointer.close()

  abstract = abstract_of(make_state(0, mesh), mesh)
  for step in [4, 3, 2, 1]:
    restored, restored_step = Checkpointer(tmp_path).restore_latest(abstract)
    assert restored_step == step
    assert_states_equal(restored, make_state(step, mesh))
    # Expose the next older checkpoint to a fresh Checkpointer.
    shutil.rmtree(tmp_path / str(step))


def test_restore_right_after_an_async_save(tmp_path):
  mesh = make_mesh()
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(1, make_state(1, mesh))

  restored, step = checkpointer.restore_latest(
      abstract_of(make_state(0, mesh), mesh))

  assert step == 1
  assert_states_equal(restored, make_state(1, mesh))


def test_save_of_an_existing_step_is_skipped(tmp_path):
  mesh = make_mesh()
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(1, make_state(1, mesh))
  checkpointer.save(1, make_state(2, mesh), wait=True)

  restored, step = checkpointer.restore_latest(
      abstract_of(make_state(0, mesh), mesh))

  assert step == 1
  assert_states_equal(restored, make_state(1, mesh))


@ignore_closed_event_loop
@pytest.mark.parametrize("how",
                         ["overwrite_data", "truncate_data", "delete_item"])
def test_unreadable_latest_falls_back_to_the_previous(tmp_path, caplog, how):
  mesh = make_mesh()
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(1, make_state(1, mesh))
  checkpointer.save(2, make_state(2, mesh))
  checkpointer.close()
  corrupt(tmp_path / "2", how)

  checkpointer = Checkpointer(tmp_path)
  abstract = abstract_of(make_state(0, mesh), mesh)
  with caplog.at_level(logging.WARNING):
    restored, step = checkpointer.restore_latest(abstract)

  assert step == 1
  assert_states_equal(restored, make_state(1, mesh))
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any("step 2" in message for message in warnings), warnings

  # The resumed run writes step 2 again, replacing the unreadable one.
  checkpointer.save(2, make_state(22, mesh), wait=True)
  restored, step = Checkpointer(tmp_path).restore_latest(abstract)
  assert step == 2
  assert_states_equal(restored, make_state(22, mesh))


def test_step_unreadable_on_another_process_is_skipped(tmp_path, monkeypatch,
                                                       caplog):
  mesh = make_mesh()
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(1, make_state(1, mesh))
  checkpointer.save(2, make_state(2, mesh), wait=True)
  # This process reads step 2, but another process of the run fails to.
  read_elsewhere = iter([False, True])

  def on_every_process(flags):  # [read, compatible] of this process
    read, compatible = flags
    return [read and next(read_elsewhere), compatible]

  monkeypatch.setattr(checkpoint.sharding, "on_every_process", on_every_process)

  with caplog.at_level(logging.WARNING):
    restored, step = checkpointer.restore_latest(
        abstract_of(make_state(0, mesh), mesh))

  assert step == 1
  assert_states_equal(restored, make_state(1, mesh))
  assert any("step 2" in r.getMessage() and "another process" in r.getMessage()
             for r in caplog.records), caplog.text


def test_checkpoint_of_another_structure_is_refused_in_one_line(tmp_path):
  mesh = make_mesh()
  Checkpointer(tmp_path).save(1, make_state(1, mesh), wait=True)
  # Another model: a wider kernel, no bias, and a head the checkpoint lacks.
  whole = NamedSharding(mesh, P())
  wanted = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=whole),
            "key": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=whole),
            "params": {"kernel": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=whole),
                       "head": {"w": jax.ShapeDtypeStruct((6,), jnp.float32,
                                                          sharding=whole),
                                "b": jax.ShapeDtypeStruct((), jnp.float32,
                                                          sharding=whole)}}}

  with pytest.raises(checkpoint.IncompatibleCheckpointError) as error:
    Checkpointer(tmp_path).restore_latest(wanted)

  message = str(error.value)
  assert "\n" not in message
  assert f"step 1 in {tmp_path}" in message
  assert "params/kernel [8, 4] there, [8, 6] here" in message
  assert "only in the checkpoint: params/bias" in message
  # The missing subtree is named once, not leaf by leaf.
  assert message.endswith("only in the state asked for: params/head"), message
  assert saved_steps(tmp_path) == [1], "a checkpoint of another run is never deleted"


@ignore_closed_event_loop
def test_no_readable_checkpoint_raises(tmp_path):
  mesh = make_mesh()
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(1, make_state(1, mesh))
  checkpointer.save(2, make_state(2, mesh))
  checkpointer.close()
  corrupt(tmp_path / "1", "overwrite_data")
  corrupt(tmp_path / "2", "truncate_data")

  with pytest.raises(RuntimeError, match=r"Tried steps \[2, 1\]") as error:
    Checkpointer(tmp_path).restore_latest(abstract_of(make_state(0, mesh),
                                                      mesh))
  assert str(tmp_path) in str(error.value)


def test_empty_directory_restores_nothing(tmp_path):
  mesh = make_mesh()
  checkpointer = Checkpointer(tmp_path / "checkpoints")

  assert checkpointer.latest_step() is None
  assert checkpointer.restore_latest(abstract_of(make_state(0, mesh),
                                                 mesh)) == (None, None)


def test_interrupted_save_is_ignored_and_removed(tmp_path):
  mesh = make_mesh()
  Checkpointer(tmp_path).save(1, make_state(1, mesh), wait=True)
  # What a process killed in the middle of writing step 2 leaves behind.
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234567890" / "state"
  partial.mkdir(parents=True)
  (partial / "_METADATA").write_text("{")

  checkpointer = Checkpointer(tmp_path)
  restored, step = checkpointer.restore_latest(
      abstract_of(make_state(0, mesh), mesh))
  assert step == 1
  assert_states_equal(restored, make_state(1, mesh))

  checkpointer.save(2, make_state(2, mesh), wait=True)
  assert not partial.parent.exists()


def test_no_preemption_in_a_single_process(tmp_path):
  assert not Checkpointer(tmp_path).reached_preemption(1)
