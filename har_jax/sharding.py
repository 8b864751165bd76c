"""One data-parallel mesh, its shardings, global batches and the multi-process start.

The state is replicated and every batch is split over the mesh's ``data`` axis;
``jax.jit`` then partitions the step (the pjit model). BatchNorm statistics are
computed over the global batch, so results do not depend on the device count.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Iterable, Iterator, Mapping, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"


def create_mesh(devices: Optional[list] = None) -> Mesh:
  """A one-axis mesh over every device of every process."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Assembles each process's share of a batch into global, sharded arrays.

  Args:
    local_batch: arrays of this process's rows, ``[B / num_processes, ...]``.
    mesh: the data-parallel mesh.

  Returns:
    The same keys as ``[B, ...]`` jax.Arrays sharded over the ``data`` axis.
  """
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local_batch.items()}


def replicate_host_data(tree: Any, mesh: Mesh) -> Any:
  """Copies host arrays (the same on every process) to every device of ``mesh``."""
  sharding = replicated(mesh)
  def put(value):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(put, tree)


def prefetch_to_mesh(local_batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Iterator[dict]:
  """Global batches of ``local_batches``, assembled ``size`` ahead by a thread.

  The host pipeline and the transfer to the devices overlap the running step.
  An exception in the producer is raised by the consumer's next call.
  """
  queue = collections.deque()
  ready = threading.Semaphore(0)
  room = threading.Semaphore(size)
  stop = threading.Event()
  done = object()

  def produce():
    try:
      for local in local_batches:
        room.acquire()
        if stop.is_set():
          return
        queue.append(global_batch(local, mesh))
        ready.release()
      queue.append(done)
    except BaseException as error:  # handed to the consumer
      queue.append(error)
    ready.release()

  thread = threading.Thread(target=produce, daemon=True, name="prefetch_to_mesh")
  thread.start()
  try:
    while True:
      ready.acquire()
      item = queue.popleft()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      room.release()
      yield item
  finally:
    stop.set()
    room.release()


def allgather_sum(value: np.ndarray) -> np.ndarray:
  """The sum over processes of each process's host array of the same shape."""
  return np.asarray(multihost_utils.process_allgather(np.asarray(value))).sum(axis=0)


def on_every_process(flags) -> np.ndarray:
  """Whether each of ``flags`` (bool [K]) holds on every process of the run: bool [K].

  A collective: every process calls it with the same K.
  """
  flags = np.asarray(flags, bool)
  if jax.process_count() == 1:
    return flags
  return np.asarray(multihost_utils.process_allgather(flags)).all(axis=0)


def _cluster_environment() -> bool:
  """Whether a multi-process launcher that jax detects by itself started us."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # Multi-host TPU slices list every worker.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts ``jax.distributed`` for multi-process runs.

  With explicit arguments they are passed through; without them the runtime is
  started only under a launcher jax detects itself (SLURM, Open MPI, TPU pod
  slices), so single-process runs need nothing.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    if None in explicit:
      raise ValueError("--coordinator_address, --num_processes and --process_id "
                       "go together: give all three or none.")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _cluster_environment():
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d, %d local of %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def to_host(tree: Any) -> Any:
  """Fetches a pytree of arrays as NumPy on every process.

  Replicated arrays are read from a local copy; sharded ones are gathered from
  every process (a collective: all processes must call this together).
  """
  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(fetch, tree)
