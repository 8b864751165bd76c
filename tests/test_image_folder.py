"""dataset="image_folder": a generated folder of PNG and JPEG files, grayscale and
colour, of two sizes, with a long-tailed training split.

One folder (module fixture) serves every test; the trained run is shared by the
training, resume and analysis checks. References come from the generator's own
record and from Pillow, not from the code under test.
"""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from har_jax import config as config_lib
from har_jax import train
from har_jax.data import folder_index
from har_jax.data import image_folder
from har_jax.data import long_tail
from har_jax.data import pipeline
from har_jax.data import streaming
import runs

sys.path.insert(0, os.path.join(runs.REPO, "experiments"))
import analyze  # pylint: disable=g-import-not-at-top,wrong-import-position
import digits_folder  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASSES = ("ant", "bee", "cat")                 # sorted, as the folders list
TRAIN_COUNTS = {"ant": 6, "bee": 30, "cat": 12}  # long-tailed, not in name order
TEST_PER_CLASS = 4
SIZES = ((40, 48), (32, 32))                    # (H, W); the second needs no resize
BRIGHTNESS = {"ant": 50, "bee": 130, "cat": 210}
TINT = {"ant": (40, -20, -20), "bee": (-20, 40, -20), "cat": (-20, -20, 40)}
# Everything a resumed run must reproduce bit for bit.
DETERMINISTIC = ("accuracy", "many", "medium", "few", "per_exit_accuracy",
                 "exit_fraction", "flops_saving", "train_loss", "steps", "validation",
                 "class_counts")
IMAGE_FOLDER_CONFIG = os.path.join(runs.REPO, "configs", "image_folder.py")


def _write_image(path, name, number, rng):
  """Image ``number`` of class ``name``: the size, mode and format cycle with
  the number, so every combination of PNG/JPEG, grayscale/colour and the two
  sizes occurs in every class."""
  height, width = SIZES[number % 2]
  pixels = (BRIGHTNESS[name] + np.array(TINT[name]) +
            rng.normal(0, 20, (height, width, 3)))
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  if number % 3 == 0:
    image = image.convert("L")
  image.save(path)


def make_folder(root, train_counts, test_per_class=TEST_PER_CLASS, seed=0,
                validation_per_class=0):
  """Writes ``root/{train,test[,validation]}/<class>/<number>.{png,jpg}``;
  returns ``{split: [(path, class name), ...]}``."""
  rng = np.random.default_rng(seed)
  written = {}
  per_split = {"train": train_counts,
               "test": {name: test_per_class for name in train_counts}}
  if validation_per_class:
    per_split["validation"] = {name: validation_per_class for name in train_counts}
  for split, counts in per_split.items():
    written[split] = []
    for name, count in counts.items():
      for number in range(count):
        # Some training images sit in a sub-folder of their class.
        sub = "session2" if split == "train" and number >= count - 2 else ""
        directory = os.path.join(root, split, name, sub)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory,
                            f"{number:03d}.{'png' if number % 4 < 2 else 'jpg'}")
        _write_image(path, name, number, rng)
        written[split].append((path, name))
  return written


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("images"))
  written = make_folder(root, TRAIN_COUNTS)
  # What a real folder holds besides images: not read, and said so.
  with open(os.path.join(root, "train", "bee", "notes.txt"), "w") as f:
    f.write("not an image")
  with open(os.path.join(root, "train", "bee", ".DS_Store"), "w") as f:
    f.write("hidden")
  os.makedirs(os.path.join(root, "scratch"))
  return root, written


def _config(root, **overrides):
  spec = importlib.util.spec_from_file_location("image_folder_config",
                                                IMAGE_FOLDER_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update({**dict(data_dir=root, model="resnet8", batch_size=16,
                        eval_batch_size=16, num_train_steps=6, warmup_epochs=1,
                        drw_start_epoch=1, lr_decay_epochs=(2,), shot_many=20,
                        shot_few=8, log_every_steps=3, checkpoint_every_steps=3),
                 **overrides})
  return config


# ----------------------------------------------------------------------------
# The index: classes, counts and files, without TensorFlow.


def test_index_has_the_folders_classes_counts_and_files(folder):
  root, written = folder
  index = folder_index.scan(root)
  assert index.class_names == CLASSES
  assert index.splits["train"].counts(3) == tuple(TRAIN_COUNTS[c] for c in CLASSES)
  assert index.splits["test"].counts(3) == (TEST_PER_CLASS,) * 3
  assert set(index.splits) == {"train", "test"}
  for split in ("train", "test"):
    listed = {(path, CLASSES[label]) for path, label in
              zip(index.splits[split].paths, index.splits[split].labels)}
    assert listed == set(written[split]), split
  assert index.ignored == (os.path.join(root, "train", "bee", "notes.txt"),)
  assert index.other_folders == (os.path.join(root, "scratch"),)
  assert folder_index.dataset_spec(root, 48) == ((48, 48, 3), 3)  # the benchmark's


def test_digits_folder_of_the_readme_example(tmp_path):
  root = str(tmp_path / "digits")
  written = digits_folder.write_digits_folder(root, imbalance_factor=10, seed=0)
  index = folder_index.scan(root)
  assert index.class_names == tuple(sorted(digits_folder.NAMES))
  for split in ("train", "validation", "test"):
    by_name = dict(zip(digits_folder.NAMES, written[split]))
    assert index.splits[split].counts(10) == tuple(by_name[n] for n in index.class_names)
  assert written["train"] == long_tail.long_tail_counts(114, 10, 10)


def test_subsample_counts_follow_the_ldam_rule_by_class_size():
  counts = [6, 30, 12, 30, 1]
  for rho in (1, 2.5, 10, 30):
    kept = long_tail.subsample_counts(counts, rho)
    # Reference: rank by size (ties by index), target int(n_max * rho^(-r/(C-1))).
    ranked = sorted(range(5), key=lambda c: (-counts[c], c))
    for rank, c in enumerate(ranked):
      target = int(30 * (1 / rho) ** (rank / 4))
      assert kept[c] == min(counts[c], target), (rho, c)
  assert long_tail.subsample_counts(counts, 1) == counts


def test_selection_holds_out_validation_and_subsamples(folder):
  root, _ = folder
  index = folder_index.scan(root)
  splits = folder_index.select(index, validation_per_class=2, imbalance_factor=1,
                               seed=0)
  assert splits["validation"].counts(3) == (2, 2, 2)
  assert splits["train"].counts(3) == (4, 28, 10)
  assert not set(splits["validation"].paths) & set(splits["train"].paths)
  again = folder_index.select(index, validation_per_class=2, imbalance_factor=1, seed=0)
  np.testing.assert_array_equal(again["train"].paths, splits["train"].paths)
  subsampled = folder_index.select(index, validation_per_class=0, imbalance_factor=10,
                                   seed=0)
  # bee 30 (rank 0), cat min(12, int(30 * 0.1^0.5)) = 9, ant min(6, 3) = 3.
  assert subsampled["train"].counts(3) == (3, 30, 9)
  assert set(subsampled["train"].paths) <= set(index.splits["train"].paths)
  np.testing.assert_array_equal(subsampled["test"].paths, index.splits["test"].paths)


# ----------------------------------------------------------------------------
# In memory: decoded, resized, labelled.


@pytest.fixture(scope="module")
def in_memory(folder):
  root, _ = folder
  return image_folder.load_image_folder(root, image_size=32, memory_budget_mb=1.0)


def _reference(path):
  """Pillow's decode, the shorter side resized to 32, the centre 32 x 32."""
  image = Image.open(path).convert("RGB")
  width, height = image.size
  scale = 32 / min(width, height)
  resized = image.resize((round(width * scale), round(height * scale)),
                         Image.BILINEAR)
  left = (resized.size[0] - 32) // 2
  top = (resized.size[1] - 32) // 2
  return np.asarray(resized).astype(int)[top:top + 32, left:left + 32]


def test_in_memory_images_are_decoded_resized_and_labelled(folder, in_memory):
  root, written = folder
  data = in_memory
  assert isinstance(data, pipeline.InMemoryData)
  assert data.class_names == CLASSES
  assert data.class_counts == tuple(TRAIN_COUNTS[c] for c in CLASSES)
  assert data.train.images.shape == (48, 32, 32, 3)
  assert data.train.images.dtype == np.uint8 and data.validation is None
  # The test split keeps the index's order: row i is file i.
  index = folder_index.scan(root)
  np.testing.assert_array_equal(data.test.labels, index.splits["test"].labels)
  assert sorted(index.splits["test"].paths) == sorted(p for p, _ in written["test"])
  for row, path in enumerate(index.splits["test"].paths):
    got = data.test.images[row].astype(int)
    want = _reference(path)
    with Image.open(path) as image:
      grayscale, size = image.mode == "L", image.size
    if grayscale:
      assert (got == got[..., :1]).all(), f"{path}: grayscale repeated over RGB"
    if path.endswith(".png"):
      tolerance = 0 if size == (32, 32) else 1   # no resize: the file's pixels
    else:
      tolerance = 6                               # two JPEG decoders
    assert np.abs(got - want).max() <= tolerance, path
  # The class brightness survives decoding: a check of the labels.
  for label, name in enumerate(CLASSES):
    mean = data.train.images[data.train.labels == label].mean()
    assert abs(mean - BRIGHTNESS[name]) < 15, name
  np.testing.assert_allclose(data.mean, (data.train.images / 255).mean(axis=(0, 1, 2)),
                             rtol=1e-6)


def test_validation_folder_is_read_as_the_validation_split(tmp_path):
  root = str(tmp_path / "images")
  make_folder(root, {"ant": 3, "bee": 2}, test_per_class=1, validation_per_class=2)
  data = image_folder.load_image_folder(root, image_size=32, memory_budget_mb=1.0)
  assert data.class_names == ("ant", "bee")
  np.testing.assert_array_equal(np.bincount(data.validation.labels), [2, 2])
  assert data.class_counts == (3, 2)
  with pytest.raises(folder_index.FolderError, match="validation_per_class=0"):
    image_folder.load_image_folder(root, image_size=32, memory_budget_mb=1.0,
                                   validation_per_class=1)


def test_subsampling_and_the_choice_of_path_are_logged(folder, caplog):
  root, _ = folder
  with caplog.at_level(logging.INFO, logger="absl"):
    data = image_folder.load_image_folder(root, image_size=32, memory_budget_mb=1.0,
                                          imbalance_factor=10)
  assert data.class_counts == (3, 30, 9)
  assert "imbalance_factor 10 subsamples the training split" in caplog.text
  assert "42 of 48 images kept" in caplog.text
  assert "kept in memory" in caplog.text
  assert "1 file(s) under the class folders are not read" in caplog.text
  assert f"{os.path.join(root, 'scratch')} is not a split folder" in caplog.text


# ----------------------------------------------------------------------------
# Streaming, when the decoded training split is over the budget.


def test_streaming_path_is_taken_over_the_budget(folder, tmp_path, caplog):
  root, written = folder
  cache = str(tmp_path / "check.json")
  with caplog.at_level(logging.INFO, logger="absl"):
    # 48 images of 32 x 32 x 3 bytes are 0.14 MiB.
    data = image_folder.load_image_folder(root, image_size=32, memory_budget_mb=0.1,
                                          check_cache=cache)
  assert isinstance(data, streaming.StreamingData)
  assert "over image_folder_memory_mb=0.1: streamed" in caplog.text
  assert "decoding each of the 60 files once" in caplog.text
  assert data.class_names == CLASSES and data.num_classes == 3
  assert data.class_counts == tuple(TRAIN_COUNTS[c] for c in CLASSES)
  assert data.split_sizes == {"train": 48, "test": 12}

  per_epoch = pipeline.steps_per_epoch(48, 16)   # 3
  run = data.train_batches(start_step=0, global_batch_size=16, seed=1)
  batches = [next(run) for _ in range(2 * per_epoch)]
  resumed = data.train_batches(start_step=4, global_batch_size=16, seed=1)
  for step in (4, 5):
    batch = next(resumed)
    np.testing.assert_array_equal(batch["images"], batches[step]["images"])
    np.testing.assert_array_equal(batch["labels"], batches[step]["labels"])
  for epoch in range(2):
    labels = np.concatenate([b["labels"] for b in batches[epoch * 3:(epoch + 1) * 3]])
    assert np.bincount(labels, minlength=3).tolist() == [6, 30, 12], "one pass"
  assert batches[0]["images"].shape == (16, 32, 32, 3)
  assert not np.array_equal(batches[0]["labels"], batches[3]["labels"])
  tested = list(data.eval_batches("test", global_batch_size=16))
  assert len(tested) == 1 and tested[0]["mask"].sum() == 12
  np.testing.assert_array_equal(np.sort(tested[0]["labels"][:12]), np.repeat([0, 1, 2], 4))

  # The check of the files is kept: a second load (a resumed run) skips it.
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="absl"):
    image_folder.load_image_folder(root, image_size=32, memory_budget_mb=0.1,
                                   check_cache=cache)
  assert "decoding each" not in caplog.text
  with open(cache) as f:
    assert json.load(f)["unreadable"] == []


# ----------------------------------------------------------------------------
# Bad input: one line each.


def _layout(tmp_path, tree):
  """Writes ``{relative path: None (a folder) | bytes}``; returns the root."""
  root = tmp_path / "bad"
  for relative, content in tree.items():
    path = root / relative
    if content is None:
      path.mkdir(parents=True, exist_ok=True)
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(content)
  return str(root)


def _png():
  image = Image.fromarray(np.full((4, 4, 3), 99, np.uint8))
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


GOOD = {"train/a/1.png": _png(), "train/b/1.png": _png(), "test/a/1.png": _png()}


@pytest.mark.parametrize("tree, message", [
    ({"train/a/1.png": _png(), "train/b/1.png": _png()}, r"has no test/ folder"),
    ({"test/a/1.png": _png()}, r"has no train/ folder"),
    ({**GOOD, "train/c/notes.txt": b"x"},
     r"class folder .*train/c holds no image .*notes.txt, are not of these types"),
    ({**GOOD, "test/b": None}, r"class folder .*test/b holds no image"),
    ({**GOOD, "test/zebra/1.png": _png()},
     r"test/zebra is a class that .*train lacks.*add .*train/zebra/"),
    ({**GOOD, "validation/zebra/1.png": _png()}, r"validation/zebra is a class that"),
    ({"train/a/1.png": _png(), "test/a/1.png": _png()},
     r"holds 1 class folder\(s\) \['a'\]; a classifier needs at least two"),
    ({**GOOD, "validation/.keep": b""}, r"validation holds no class folder"),
], ids=["no_test", "no_train", "empty_class", "empty_test_class", "test_class_unknown",
        "validation_class_unknown", "one_class", "empty_validation"])
def test_bad_layouts_are_one_line(tmp_path, tree, message):
  root = _layout(tmp_path, tree)
  with pytest.raises(folder_index.FolderError, match=message) as error:
    folder_index.scan(root)
  assert "\n" not in str(error.value)


def test_missing_data_dir_is_one_line(tmp_path):
  with pytest.raises(folder_index.FolderError, match="is not a directory"):
    folder_index.scan(str(tmp_path / "nowhere"))
  config = _config("")
  with pytest.raises(config_lib.ConfigError, match="--config.data_dir=ROOT"):
    config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize("budget", [1.0, 0.0], ids=["in_memory", "streaming"])
def test_an_unreadable_file_is_named_or_skipped(tmp_path, budget, caplog):
  root = _layout(tmp_path, {**GOOD, "train/a/2.png": _png(),
                            "train/b/broken.png": b"not a png",
                            "train/b/cut.jpg": b"\xff\xd8\xff\xe0 truncated"})
  with pytest.raises(folder_index.FolderError) as error:
    image_folder.load_image_folder(root, image_size=32, memory_budget_mb=budget)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(os.path.join(root, "train", "b", "broken.png") +
                            " is not a readable image (2 unreadable file(s) in the "
                            "train split)"), message
  assert "image_folder_skip_unreadable=True" in message
  with caplog.at_level(logging.WARNING):
    data = image_folder.load_image_folder(root, image_size=32, memory_budget_mb=budget,
                                          skip_unreadable=True)
  assert data.class_counts == (2, 1)
  assert "2 unreadable file(s) of the train split left out" in caplog.text
  # A class whose every image is unreadable cannot be trained on.
  os.remove(os.path.join(root, "train", "b", "1.png"))
  with pytest.raises(folder_index.FolderError,
                     match="class 'b' has no readable training image left"):
    image_folder.load_image_folder(root, image_size=32, memory_budget_mb=budget,
                                   skip_unreadable=True)


def test_a_run_resumes_on_its_folder_moved_but_not_on_another(tmp_path):
  root = _layout(tmp_path, {**GOOD, "train/a/2.png": _png()})
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  image_folder.load_from_config(_config(root), workdir=workdir)
  moved = str(tmp_path / "moved")
  shutil.copytree(root, moved)
  image_folder.load_from_config(_config(moved), workdir=workdir)
  os.remove(os.path.join(moved, "train", "a", "2.png"))
  with pytest.raises(folder_index.FolderError) as error:
    image_folder.load_from_config(_config(moved), workdir=workdir)
  assert str(error.value) == (
      f"the run in {workdir} was started on another folder (2 classes, class 0 'a' "
      f"with 2 training images) than {moved} gives now (2 classes, class 0 'a' with "
      f"1 training images); resume it on the folder it was trained on, or give this "
      f"folder a new workdir.")


def test_command_line_reports_a_bad_folder_with_exit_code_2(tmp_path):
  root = _layout(tmp_path, {"train/a/1.png": _png(), "train/b/1.png": _png()})
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  result = subprocess.run(
      [sys.executable, "-m", "har_jax.main", f"--config={IMAGE_FOLDER_CONFIG}",
       f"--config.data_dir={root}", f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, env=env, cwd=runs.REPO, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  messages = [line for line in result.stderr.splitlines() if line.startswith("har_jax")]
  assert messages == [f"har_jax: error: image_folder: {root} has no test/ folder; "
                      f"image_folder reads {folder_index.LAYOUT}."], result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------
# Training, exact resume and the analyses, in memory; a streaming run.


TRAINED = dict(validation_per_class=1, eval_every_epochs=2)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
  root, _ = folder
  # One image per class held out for validation: 45 training images, 2 steps an
  # epoch; validated at step 4, checkpointed at 3 and 6.
  config = _config(root, **TRAINED)
  workdir = str(tmp_path_factory.mktemp("run"))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_run_trains_on_the_folders_class_counts(trained):
  _, _, summary = trained
  assert summary["steps"] == 6 and summary["train_step_compiles"] == 1
  assert np.isfinite(summary["train_loss"])
  assert summary["class_counts"] == [5, 29, 11]   # the folder's, less one held out
  # shot_many 20, shot_few 8: bee many, cat medium, ant few; the test split
  # has every class, so every group has an accuracy.
  assert all(summary[group] is not None for group in ("many", "medium", "few"))
  assert summary["validation"]["best_step"] == 4
  np.testing.assert_allclose(sum(summary["exit_fraction"]), 1.0, rtol=1e-6)


def test_resumed_run_ends_where_the_uninterrupted_one_ends(trained, tmp_path):
  config, workdir, summary = trained
  resumed = str(tmp_path / "resumed")
  # What an interruption after the checkpoint of step 3 leaves behind.
  shutil.copytree(os.path.join(workdir, "checkpoints", "3"),
                  os.path.join(resumed, "checkpoints", "3"))
  again = train.train_and_evaluate(config, resumed)
  for field in DETERMINISTIC:
    assert again[field] == summary[field], field


def test_analysis_names_the_classes(trained):
  _, workdir, summary = trained
  output = os.path.join(workdir, "analysis")
  numbers = analyze.run_analysis(workdir, output, max_accuracy_drop=0.05)
  assert numbers["class_names"] == list(CLASSES)
  assert numbers["class_counts"] == summary["class_counts"]
  assert numbers["test"]["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-6)
  # One class per shot group: its accuracy is the group's.
  for name, group in (("bee", "many"), ("cat", "medium"), ("ant", "few")):
    c = CLASSES.index(name)
    assert numbers["shot_groups"][c] == group
    assert numbers["test"]["per_class_accuracy"][c] == pytest.approx(summary[group],
                                                                     abs=1e-6)
  with open(os.path.join(output, "report.md"), encoding="utf-8") as f:
    report = f.read()
  rows = [line for line in report.splitlines() if line.startswith(("| ant", "| bee",
                                                                   "| cat"))]
  # The per-class table, most to least trained.
  assert [row.split(" | ")[0] for row in rows] == ["| bee (29)", "| cat (11)", "| ant (5)"]
  assert os.path.exists(os.path.join(output, "exit_by_class.png"))


def test_streaming_run_trains_and_evaluates(folder, trained, tmp_path):
  root, _ = folder
  _, workdir, _ = trained
  # The trained run's last state goes on for a step on the streaming path; a
  # fresh state would only add the compile of its initialisation.
  shutil.copytree(os.path.join(workdir, "checkpoints", "6"),
                  os.path.join(tmp_path, "checkpoints", "6"))
  config = _config(root, **TRAINED, image_folder_memory_mb=0.0, num_train_steps=7)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 7 and summary["train_step_compiles"] == 1
  assert np.isfinite(summary["train_loss"])
  assert summary["class_counts"] == [5, 29, 11]
  assert os.path.exists(tmp_path / image_folder.CHECK_FILE)  # the streaming path's
  np.testing.assert_allclose(sum(summary["exit_fraction"]), 1.0, rtol=1e-6)
