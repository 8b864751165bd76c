"""The reports of experiments/reproduce.py: results.md, results.json and the
per-table figures, from the summaries of finished cells and the published
numbers (experiments/paper_results.json). Pure functions of those, except the
plotting, which only draws them."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib
matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

import tables as tables_lib

COLUMNS = ("many", "medium", "few", "accuracy", "flops_saving")
_SETTING_LABELS = {"cifar10": "C10", "cifar100": "C100", "imagenet_lt": "ImageNet-LT",
                   "i_naturalist2018": "iNat18", "digits": "digits"}


def aggregate(summaries: Sequence[dict]) -> dict:
  """Mean and std over seeds, in %, of each of COLUMNS; ``seeds`` that finished.
  A column no seed measured (a shot group without classes) is left out."""
  row = {"seeds": len(summaries)}
  for column in COLUMNS:
    values = [100 * s[column] for s in summaries if s.get(column) is not None]
    if values:
      row[column] = [float(np.mean(values)), float(np.std(values))]
  return row


def setting_label(dataset: str, rho: Optional[float]) -> str:
  label = _SETTING_LABELS.get(dataset, dataset)
  return label if rho is None else f"{label} ×{rho:g}"


def table_results(table: tables_lib.Table, settings, rows, summaries: dict,
                  paper: dict) -> dict:
  """``{row: {setting: {"seeds", metric: [mean, std], "paper": {metric: v}}}}``
  of one table; ``summaries``: (setting, run name, stage) -> summaries."""
  published = paper.get(table.name, {})
  results = {}
  for row in rows:
    entry = {}
    for dataset, rho in settings:
      key = tables_lib.setting_key(dataset, rho)
      cell = aggregate(summaries.get((key, row.run.name, row.stage), []))
      values = published.get(row.name, {}).get("values", {}).get(key)
      if values:
        cell["paper"] = values
      entry[key] = cell
    results[row.name] = entry
  return results


def _cell_text(cell: dict, metric: str, seeds: int) -> str:
  """``71.00 ± 1.00 (paper 70.4, +0.60)``; ``—`` where no seed finished."""
  published = cell.get("paper", {}).get(metric)
  if metric not in cell:
    return "—" if published is None else f"— (paper {published:g})"
  mean, std = cell[metric]
  text = f"{mean:.2f} ± {std:.2f}" if cell["seeds"] > 1 else f"{mean:.2f}"
  if cell["seeds"] < seeds:
    text += f" [{cell['seeds']}/{seeds} seeds]"
  if published is not None:
    text += f" (paper {published:g}, {mean - published:+.2f})"
  return text


def table_markdown(table: tables_lib.Table, settings, rows, results: dict,
                   seeds: int, paper_notes: dict) -> str:
  """One table as the paper lays it out: rows are methods, columns setting x
  metric; the FLOPs-saving rows carry the saving in the All columns."""
  columns = [(tables_lib.setting_key(*s), setting_label(*s), m)
             for s in settings for m in table.metrics]
  lines = [f"### {table.title}", ""]
  if table.note:
    lines += [table.note, ""]
  lines += ["| method | " + " | ".join(f"{label} {tables_lib.METRIC_NAMES[m]}"
                                       for _, label, m in columns) + " |",
            "|---" * (len(columns) + 1) + "|"]
  staged = False
  for row in rows:
    name = row.name
    if row.stage:
      name += " *"
      staged = True
    lines.append(f"| {name} | " + " | ".join(
        _cell_text(results[row.name][key], metric, seeds)
        for key, _, metric in columns) + " |")
    if row.name in table.flops_rows:
      lines.append(f"| FLOPs saving of {row.name} | " + " | ".join(
          _cell_text(results[row.name][key], "flops_saving", seeds)
          if metric == "accuracy" else "" for key, _, metric in columns) + " |")
  lines.append("")
  if staged:
    lines += ["\\* a second stage (har_jax.decouple) applied to a trained run: the "
              "one named before the arrow (Table B: CE).", ""]
  for row, note in paper_notes.items():
    if any(r.name == row for r in rows):
      lines += [f"Paper, {row}: {note}", ""]
  return "\n".join(lines)


def plot_table(table: tables_lib.Table, settings, rows, results: dict,
               output: str) -> list[str]:
  """Per setting: accuracy by shot group per row (bars) and accuracy against
  FLOPs saving (points), ours as means over seeds. Returns the files."""
  os.makedirs(output, exist_ok=True)
  written = []
  groups = ("many", "medium", "few", "accuracy")
  for dataset, rho in settings:
    key = tables_lib.setting_key(dataset, rho)
    label = setting_label(dataset, rho)
    cells = [results[row.name][key] for row in rows]
    names = [row.name for row in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 3.6))
    width = 0.8 / len(groups)
    positions = np.arange(len(rows))
    for offset, group in enumerate(groups):
      values = [cell[group][0] if group in cell else np.nan for cell in cells]
      ax.bar(positions + (offset - 1.5) * width, values, width,
             label=tables_lib.METRIC_NAMES[group])
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{table.name}: {label}, accuracy by shot group")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path = os.path.join(output, f"{table.name}_{key}_shot_groups.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for name, cell in zip(names, cells):
      if "accuracy" in cell and "flops_saving" in cell:
        x, y = cell["flops_saving"][0], cell["accuracy"][0]
        ax.scatter([x], [y], s=14)
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("FLOPs saving (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{table.name}: {label}, accuracy against FLOPs saving")
    fig.tight_layout()
    path = os.path.join(output, f"{table.name}_{key}_accuracy_flops.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written
