"""The paper's tables and the lecture's comparison, declared as data.

A table is rows (methods) by settings (data set x imbalance factor); a row is a
stage-one :class:`Run` (config fields of its methods) and an optional second
stage applied to that run (``har_jax.decouple``). experiments/reproduce.py turns
every (setting, run, seed) into one training run and every stage into one call
on it; nothing here runs anything.

Each method's hyper-parameters are in :data:`HYPERPARAMETERS`, per data-set
family, with their source; each data set's recipe (config file, model, exit
strings) is in :data:`RECIPES`. Two rows of any tables that name the same run
share its folder, so CE on ImageNet-LT trains once for Tables A, B and D.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping, Optional

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The numbers a table's cells report, in the order of its columns (summary.json
# fields; percentages in the report).
METRIC_NAMES = {"many": "Many", "medium": "Med", "few": "Few", "accuracy": "All",
                "flops_saving": "FLOPs saving"}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a data set trains: its config file (the paper's schedule for it), the
  exit strings of the single-exit baselines and of HAR, and the smoke's
  stand-in model, which keeps the stage layout (so every exit string fits)."""

  config_file: str           # under configs/
  family: str                # "cifar" or "imagenet": which hyper-parameters apply
  single_exit: str
  multi_exit: str
  model: str
  smoke_model: str
  # Fields that adapt the config file to the paper's tables.
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def config(self) -> ml_collections.ConfigDict:
    """The config file's ``get_config()`` with this recipe's fields."""
    config = load_config_file(self.config_file)
    config.update(dict(self.fields, model=self.model))
    return config


def load_config_file(name: str) -> ml_collections.ConfigDict:
  """``get_config()`` of ``configs/<name>``."""
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


RECIPES = {
    # LDAM-DRW's CIFAR-LT recipe (ResNet-32, 200 epochs, DRW from 160).
    "cifar10": Recipe("cifar10_lt.py", "cifar", "CBBBE", "CBEBEBE", "resnet32", "resnet8"),
    "cifar100": Recipe("cifar100_lt.py", "cifar", "CBBBE", "CBEBEBE", "resnet32",
                       "resnet8"),
    # The paper's ImageNet-LT and iNaturalist tables are ResNet-50 (Kang et al.'s
    # ResNet-50 numbers are the ones Table B copies); 90 epochs, DRW from 60.
    "imagenet_lt": Recipe("imagenet_lt.py", "imagenet", "CBBBBE", "CBBEBEBE", "resnet50",
                          "resnet50_mini"),
    "i_naturalist2018": Recipe("inat18.py", "imagenet", "CBBBBE", "CBBEBEBE", "resnet50",
                               "resnet50_mini"),
    # The offline default set (configs/default.py, ResNet-8 on 8x8 digits) with
    # the CIFAR recipe's proportions at 30 epochs: warm-up 1, DRW and the first
    # decay at 24 (80%), the second at 27 (90%), so that the 63 runs of the cifar
    # and lecture tables finish on 2 CPU cores.
    "digits": Recipe("default.py", "cifar", "CBBBE", "CBEBEBE", "resnet8", "resnet8",
                     fields=dict(num_epochs=30, warmup_epochs=1, drw_start_epoch=24,
                                 lr_decay_epochs=(24, 27), log_every_steps=35,
                                 checkpoint_every_steps=210)),
}

# Config fields of each method, per data-set family ("*": every family), and
# where the values come from. DRW and HAR take their recipe's values (the
# config files: DRW from epoch 160 of 200 on CIFAR, 60 of 90 on ImageNet-LT and
# iNaturalist, beta 0.9999, Cao et al. 2019; HAR's threshold 0.9, Duggal et al.).
HYPERPARAMETERS = {
    "ce": {"*": dict(loss="ce"), "source": "cross-entropy"},
    "focal": {"*": dict(loss="focal", focal_gamma=1.0),
              "source": "gamma = 1: Cao et al. 2019's focal baseline (CIFAR) and the "
                        "middle of Table A's sweep (ImageNet-LT, Focal+DRW)"},
    "focal_0.5": {"*": dict(loss="focal", focal_gamma=0.5), "source": "Table A"},
    "focal_2": {"*": dict(loss="focal", focal_gamma=2.0), "source": "Table A"},
    "ldam": {"*": dict(loss="ldam", ldam_max_margin=0.5, ldam_scale=30.0),
             "source": "Cao et al. 2019: max margin 0.5, scale 30, cosine head"},
    "cdt": {"*": dict(loss="cdt", cdt_gamma=0.2),
            "source": "Ye et al. 2020 / Zhang et al. 2021 (BagofTricks-LT): gamma 0.2 "
                      "on CIFAR x100"},
    "logit_adjusted": {"*": dict(loss="logit_adjusted", logit_adjust_tau=1.0),
                       "source": "Menon et al. 2021: tau = 1"},
    "mixup": {"cifar": dict(mixing="mixup", mixup_alpha=1.0),
              "imagenet": dict(mixing="mixup", mixup_alpha=0.2),
              "source": "Zhang et al. 2018: alpha 1 on CIFAR, 0.2 on ImageNet"},
    "manifold": {"*": dict(mixing="manifold", mixup_alpha=2.0, mixing_stages=(0, 1, 2)),
                 "source": "Verma et al. 2019: alpha 2, the input or after stage 1 or 2"},
    "mfw": {"*": dict(mixing="mfw", mixing_stages=(0, 1, 2), mfw_max_probability=0.5,
                      mfw_power=1.0, mfw_strength=0.5),
            "source": "Ye et al. 2021 as the lecture describes it; the parameters are "
                      "har_jax's reading (README, Long-tail baselines)"},
    "class_balanced": {"*": dict(sampler="class_balanced"), "source": "Kang et al. 2020"},
    "square_root": {"*": dict(sampler="square_root"), "source": "Kang et al. 2020"},
    "progressive": {"*": dict(sampler="progressive"),
                    "source": "Kang et al. 2020: over all epochs"},
}

_LABELS = {"ce": "CE", "focal": "Focal", "focal_0.5": "Focal(γ=0.5)",
           "focal_2": "Focal(γ=2)", "ldam": "LDAM", "cdt": "CDT",
           "logit_adjusted": "LA loss", "mixup": "Mixup", "manifold": "Manifold Mixup",
           "mfw": "MFW", "class_balanced": "CB sampling", "square_root": "sqrt sampling",
           "progressive": "progressive sampling"}


def method_fields(method: str, family: str) -> dict:
  """The config fields of ``method`` (a key of HYPERPARAMETERS) for ``family``."""
  entry = HYPERPARAMETERS[method]
  return dict(entry.get("*", {}), **entry.get(family, {}))


@dataclasses.dataclass(frozen=True)
class Run:
  """A stage-one training run: a loss, optional sampler / mixing, HAR, DRW.

  ``exits`` None: the recipe's multi-exit string with HAR, its single-exit
  string without (the plain backbone).
  """

  loss: str = "ce"
  extras: tuple[str, ...] = ()   # keys of HYPERPARAMETERS: a sampler, a mixing
  har: bool = False
  drw: bool = False
  exits: Optional[str] = None

  @property
  def name(self) -> str:
    """Unique among runs, the folder's name too: e.g. ``HAR(LDAM)+DRW``."""
    name = f"HAR({_LABELS[self.loss]})" if self.har else _LABELS[self.loss]
    for extra in self.extras:
      name += f"+{_LABELS[extra]}"
    if self.drw:
      name += "+DRW"
    if self.exits is not None:
      name += f" {self.exits}"
    return name

  def fields(self, recipe: Recipe) -> dict:
    """The config fields of this run on top of ``recipe.config()``."""
    fields = method_fields(self.loss, recipe.family)
    for extra in self.extras:
      fields.update(method_fields(extra, recipe.family))
    default_exits = recipe.multi_exit if self.har else recipe.single_exit
    fields.update(har=self.har, exits=self.exits or default_exits, head="auto")
    if not self.drw:
      fields["drw_start_epoch"] = -1
    return fields


@dataclasses.dataclass(frozen=True)
class Row:
  """A row of a table: ``run``, then optionally the second stage ``stage``
  (``har_jax.decouple``'s method) applied to it."""

  name: str
  run: Run
  stage: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Table:
  name: str
  title: str
  # (data set, imbalance factor) columns; None where the data set fixes its own
  # long tail (ImageNet-LT, iNaturalist).
  settings: tuple[tuple[str, Optional[float]], ...]
  metrics: tuple[str, ...]       # keys of METRIC_NAMES, per setting
  rows: tuple[Row, ...]
  flops_rows: tuple[str, ...] = ()   # rows whose FLOPs saving gets a row of its own
  note: str = ""


def setting_key(dataset: str, rho: Optional[float]) -> str:
  """``cifar10_r100``, ``imagenet_lt``: a setting's name in folders and JSON."""
  return dataset if rho is None else f"{dataset}_r{rho:g}"


CE = Run()
HAR_CE = Run(har=True)
CE_DRW = Run(drw=True)
HAR_CE_DRW = Run(har=True, drw=True)
LDAM = Run(loss="ldam")
HAR_LDAM = Run(loss="ldam", har=True)
LDAM_DRW = Run(loss="ldam", drw=True)
HAR_LDAM_DRW = Run(loss="ldam", har=True, drw=True)
STAGES = ("crt", "lws", "tau_norm", "logit_adjust")
_STAGE_LABELS = {"crt": "cRT", "lws": "LWS", "tau_norm": "τ-norm",
                 "logit_adjust": "post-hoc LA"}

_CIFAR = tuple((d, r) for d in ("cifar10", "cifar100") for r in (100.0, 50.0, 10.0))
_IMAGENET = (("imagenet_lt", None),)


def _lecture_rows() -> tuple[Row, ...]:
  """Each lecture method alone (on CE) and with HAR. The methods re-balance by
  themselves, so they go without DRW; CE+DRW and HAR(CE)+DRW stand beside them."""
  rows = [Row("CE", CE), Row("HAR(CE)", HAR_CE), Row("CE+DRW", CE_DRW),
          Row("HAR(CE)+DRW", HAR_CE_DRW)]
  for har in (False, True):
    for sampler in ("class_balanced", "square_root", "progressive"):
      run = Run(extras=(sampler,), har=har)
      rows.append(Row(run.name, run))
    for loss in ("cdt", "logit_adjusted"):
      run = Run(loss=loss, har=har)
      rows.append(Row(run.name, run))
    run = Run(extras=("mfw",), har=har)
    rows.append(Row(run.name, run))
    for stage in STAGES:
      base = HAR_CE if har else CE
      rows.append(Row(f"{base.name} → {_STAGE_LABELS[stage]}", base, stage))
  return tuple(rows)


TABLES = {table.name: table for table in (
    Table("cifar", "Table C. CIFAR-10-LT and CIFAR-100-LT (All accuracy), ResNet-32",
          _CIFAR, ("accuracy",),
          (Row("CE", CE), Row("Focal", Run(loss="focal")),
           Row("Mixup", Run(extras=("mixup",))),
           Row("Manifold Mixup", Run(extras=("manifold",))),
           Row("CE+DRW", CE_DRW), Row("HAR(CE)+DRW", HAR_CE_DRW),
           Row("LDAM+DRW", LDAM_DRW), Row("HAR(LDAM)+DRW", HAR_LDAM_DRW)),
          flops_rows=("HAR(CE)+DRW", "HAR(LDAM)+DRW")),
    Table("imagenet_inat", "Table B. ImageNet-LT and iNaturalist 2018, ResNet-50",
          (("imagenet_lt", None), ("i_naturalist2018", None)),
          ("many", "medium", "few", "accuracy"),
          (Row("CE", CE), Row("cRT", CE, "crt"), Row("LWS", CE, "lws"),
           Row("τ-norm", CE, "tau_norm"), Row("Focal+DRW", Run(loss="focal", drw=True)),
           Row("CE+DRW", CE_DRW), Row("HAR(CE)+DRW", HAR_CE_DRW),
           Row("LDAM+DRW", LDAM_DRW), Row("HAR(LDAM)+DRW", HAR_LDAM_DRW)),
          flops_rows=("HAR(CE)+DRW", "HAR(LDAM)+DRW")),
    Table("imagenet_losses", "Table A. HAR's impact on accuracy, ResNet-50 on ImageNet-LT",
          _IMAGENET, ("many", "medium", "few", "accuracy"),
          (Row("Focal (γ = 0.5)", Run(loss="focal_0.5")),
           Row("Focal (γ = 1.0)", Run(loss="focal")),
           Row("Focal (γ = 2.0)", Run(loss="focal_2")),
           Row("CE", CE), Row("HAR (CE)", HAR_CE), Row("LDAM", LDAM),
           Row("HAR (LDAM)", HAR_LDAM))),
    Table("exits", "Table D. Impact of each exit, HAR(CE), ResNet-50 on ImageNet-LT",
          _IMAGENET, ("many", "medium", "few", "accuracy", "flops_saving"),
          tuple(Row(exits, Run(har=exits != "CBBBBE",
                               exits=None if exits in ("CBBBBE", "CBBEBEBE") else exits))
                for exits in ("CBBBBE", "CBBBEBE", "CBBEBEBE", "CBEBEBEBE", "CEBEBEBEBE")),
          note="The loss of this ablation is not given; har_jax runs HAR(CE), Table A's "
               "HAR row. CBBBBE has no early exit: it is CE."),
    Table("lecture", "The lecture's methods, each alone and with HAR, CIFAR-LT x100, "
          "ResNet-32", (("cifar10", 100.0), ("cifar100", 100.0)),
          ("many", "medium", "few", "accuracy", "flops_saving"), _lecture_rows(),
          note="Published numbers from each method's own paper (ResNet-32, CIFAR x100): "
               "Zhang et al. 2021 (BagofTricks-LT) and Menon et al. 2021."),
)}

# --datasets=digits: the tables that run on the offline default set, each in
# one setting (imbalance factor 10, the default config's).
DIGITS_TABLES = ("cifar", "lecture")
DIGITS_SETTINGS = (("digits", 10.0),)
