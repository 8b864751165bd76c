"""har_jax.runtime: the unused-GPU warning and the persistent compilation cache's switches."""

import jax
import pytest

from har_jax import runtime


def test_warns_in_one_line_with_the_fix_when_a_gpu_goes_unused():
  for smi, device_file in ((True, False), (False, True), (True, True)):
    warning = runtime.missing_gpu_warning("cpu", nvidia_smi_on_path=smi,
                                          nvidia_device_file=device_file)
    assert runtime.CUDA_INSTALL in warning and "\n" not in warning
  assert runtime.missing_gpu_warning("cpu", nvidia_smi_on_path=False,
                                     nvidia_device_file=False) is None
  assert runtime.missing_gpu_warning("gpu", nvidia_smi_on_path=True,
                                     nvidia_device_file=True) is None
  # JAX_PLATFORMS=cpu: the user chose the CPU.
  assert runtime.missing_gpu_warning("cpu", nvidia_smi_on_path=True, nvidia_device_file=True,
                                     jax_platforms="cpu") is None


@pytest.fixture
def cache_settings():
  """Restores JAX's cache settings, which the test changes (nothing compiles meanwhile)."""
  saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_enable_compilation_cache", saved[1])


def test_the_cache_defaults_to_har_jax_s_folder_unless_jax_s_settings_say(cache_settings):
  jax.config.update("jax_compilation_cache_dir", None)
  jax.config.update("jax_enable_compilation_cache", True)
  assert runtime.enable_compilation_cache() == str(runtime.DEFAULT_COMPILATION_CACHE)
  assert jax.config.jax_compilation_cache_dir == str(runtime.DEFAULT_COMPILATION_CACHE)
  # JAX_COMPILATION_CACHE_DIR (or the config) moves it.
  jax.config.update("jax_compilation_cache_dir", "/elsewhere")
  assert runtime.enable_compilation_cache() == "/elsewhere"
  # JAX_ENABLE_COMPILATION_CACHE=false turns it off.
  jax.config.update("jax_enable_compilation_cache", False)
  assert runtime.enable_compilation_cache() is None
