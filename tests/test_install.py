"""setup.py's installs: the library alone, [train], [test] and the accelerator extras.

The library test needs no network and no new install: it links, from this
environment, exactly the distributions that `pip install har_jax` resolves to
(install_requires and their own requirements, read from their metadata) into a
temporary directory and runs Python on that directory and the repository alone
(`python -I -S`: no site-packages, no PYTHONPATH). An import of anything else
(TensorFlow, clu, ml_collections, scikit-learn, ...) fails there. What it does
not show: that pip would pick these same versions on another machine.
"""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
from unittest import mock

from packaging.markers import default_environment
from packaging.requirements import Requirement
import pytest

from har_jax import runtime
import runs

REPO = pathlib.Path(runs.REPO)
# What `pip install har_jax` promises (README), and the train step that
# experiments/gpu_benchmark.py times: these import with install_requires.
LIBRARY_MODULES = ["har_jax", "har_jax.losses", "har_jax.models", "har_jax.early_exit",
                   "har_jax.mixing", "har_jax.train"]
# The trainer's distributions ([train]), none of which the library may need.
TRAINER_ONLY = {"tensorflow-cpu": "tensorflow", "tensorflow-datasets": "tensorflow_datasets",
                "clu": "clu", "ml-collections": "ml_collections",
                "scikit-learn": "sklearn", "matplotlib": "matplotlib"}
# experiments/ files that need the [torch] extra rather than [test].
TORCH_EXTRA_FILES = {"compare_torch.py", "torch_reference.py"}


def _name(distribution: str) -> str:
  return re.sub(r"[-_.]+", "-", distribution).lower()


@pytest.fixture(scope="module")
def setup_arguments() -> dict:
  """The keyword arguments setup.py passes to setuptools.setup."""
  with mock.patch("setuptools.setup") as setup:
    code = compile((REPO / "setup.py").read_text(), str(REPO / "setup.py"), "exec")
    exec(code, {"__file__": str(REPO / "setup.py"), "__name__": "__main__"})  # pylint: disable=exec-used
  return setup.call_args.kwargs


def requirement_closure(requirements) -> set:
  """The distributions (normalised names) these requirements install, extras and
  environment markers included, as this environment's metadata declares them."""
  extras_of = {}
  pending = [Requirement(text) for text in requirements]
  while pending:
    requirement = pending.pop()
    name = _name(requirement.name)
    extras = set(requirement.extras)
    if name in extras_of and extras <= extras_of[name]:
      continue
    extras_of[name] = extras_of.get(name, set()) | extras
    for text in importlib.metadata.requires(requirement.name) or []:
      dependency = Requirement(text)
      if dependency.marker is None or any(
          dependency.marker.evaluate({**default_environment(), "extra": extra})
          for extra in extras_of[name] or {""}):
        pending.append(dependency)
  return set(extras_of)


def link_distributions(names, directory: pathlib.Path) -> None:
  """Links every file of these installed distributions into ``directory``, laid
  out as in site-packages (file by file, so namespace packages stay partial)."""
  for name in names:
    distribution = importlib.metadata.distribution(name)
    for file in distribution.files or ():
      if file.parts[0] == ".." or "__pycache__" in file.parts:
        continue  # console scripts; byte code
      target = directory / file
      target.parent.mkdir(parents=True, exist_ok=True)
      if not target.exists():
        target.symlink_to(distribution.locate_file(file))


LIBRARY_CHECK = """
import importlib, sys
import numpy as np
for module in MODULES:
  importlib.import_module(module)
import jax, jax.numpy as jnp
from har_jax import early_exit, losses, models
rng = np.random.default_rng(0)
logits = rng.normal(size=(2, 6, 4)).astype(np.float32)   # [E, B, C]
labels = np.array([0, 1, 2, 3, 0, 1])
# Threshold 1 trains every exit on every example: the mean over examples of
# the summed per-exit cross-entropies.
log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
want = -log_p[:, np.arange(6), labels].sum(0).mean()
got = float(losses.har_loss(jnp.asarray(logits), jnp.asarray(labels), threshold=1.0))
assert abs(got - want) < 1e-5 * abs(want), (got, want)
model = models.resnet8(4, exits="CBEBEBE")
images = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
variables = model.init(jax.random.PRNGKey(0), images, train=False)
exit_logits = model.apply(variables, images, train=False)
assert exit_logits.shape == (3, 2, 4), exit_logits.shape
early_exit.predict(exit_logits, threshold=0.5)
# The environment is what it claims to be: the trainer's packages are absent.
for module in TRAINER_ONLY:
  try:
    importlib.import_module(module)
  except ImportError:
    continue
  raise AssertionError(f"{module} imports in the library environment")
print("library ok:", " ".join(MODULES))
"""


def test_the_library_imports_and_computes_with_only_install_requires(
    setup_arguments, tmp_path):
  closure = requirement_closure(setup_arguments["install_requires"])
  assert {"jax", "jaxlib", "flax", "optax", "numpy"} <= closure
  assert not closure & set(TRAINER_ONLY), closure & set(TRAINER_ONLY)
  link_distributions(closure, tmp_path)
  script = (f"import sys\nsys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]\n"
            f"MODULES = {LIBRARY_MODULES!r}\nTRAINER_ONLY = {list(TRAINER_ONLY.values())!r}\n"
            + LIBRARY_CHECK)
  result = subprocess.run([sys.executable, "-I", "-S", "-c", script],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"library ok: {' '.join(LIBRARY_MODULES)}" in result.stdout, result.stdout


def _third_party_imports(path: pathlib.Path) -> set:
  """Top-level names of the modules a file imports, anywhere in it."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split(".")[0])
  return names


def test_the_test_extra_installs_what_the_suite_and_the_trainer_import(setup_arguments):
  extras = setup_arguments["extras_require"]
  assert set(extras["train"]) <= set(extras["test"])
  installed = requirement_closure([*setup_arguments["install_requires"], *extras["test"]])
  providers = importlib.metadata.packages_distributions()
  files = [*REPO.glob("har_jax/**/*.py"), *REPO.glob("tests/*.py"),
           *(p for p in REPO.glob("experiments/*.py") if p.name not in TORCH_EXTRA_FILES)]
  missing = {}
  for path in files:
    for module in _third_party_imports(path):
      distributions = {_name(d) for d in providers.get(module, [])} - {"har-jax"}
      if distributions and not distributions & installed:
        missing.setdefault(module, []).append(str(path.relative_to(REPO)))
  assert not missing, f"imported but not installed by .[test]: {missing}"


def test_accelerator_extras_pin_the_library_s_jax(setup_arguments):
  # The extras the unused-GPU warning tells users to install exist.
  named = re.search(r"\[(.*)\]", runtime.CUDA_INSTALL).group(1).split(",")
  assert set(named) <= set(setup_arguments["extras_require"]), named
  jax_requirement = next(Requirement(r) for r in setup_arguments["install_requires"]
                         if Requirement(r).name == "jax")
  for extra, jax_extra in (("cuda", "cuda12"), ("tpu", "tpu")):
    (requirement,) = map(Requirement, setup_arguments["extras_require"][extra])
    assert requirement.name == "jax" and requirement.extras == {jax_extra}
    assert requirement.specifier == jax_requirement.specifier
