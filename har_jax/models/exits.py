"""Exit placement in the paper's notation.

An exit string reads left to right along the network: ``C`` the stem, ``B`` one residual
stage, ``E`` an exit after whatever precedes it. ResNet-32 (3 stages) with exits after
stages 1 and 2 is ``CBEBEBE``; the single-exit backbone is ``CBBBE``.
"""

_SYMBOLS = {"C": "the stem", "B": "one residual stage", "E": "an exit"}


def parse_exits(exits: str, num_stages: int, *,
                model_name: str = "the model") -> tuple[int, ...]:
  """Exit positions of an exit string.

  Args:
    exits: e.g. ``"CBEBEBE"``. Starts with ``C``, ends with ``E`` (the final
      classifier), has one ``B`` per stage and never two ``E`` in a row.
    num_stages: number of residual stages of the model (3 for CIFAR ResNets, 4 for
      ResNet-50).
    model_name: used in error messages only.

  Returns:
    Exit positions, increasing: 0 is "after the stem", j is "after stage j"
    (1-based). The last is always ``num_stages``:
    ``parse_exits("CBEBEBE", 3) == (1, 2, 3)``.

  Raises:
    ValueError: naming the offending character and its index, or the wrong count.
  """
  for index, symbol in enumerate(exits):
    if symbol not in _SYMBOLS:
      raise ValueError(
          f"exits {exits!r} has {symbol!r} at index {index}; allowed are "
          + ", ".join(f"'{s}' ({meaning})" for s, meaning in _SYMBOLS.items()))
  if not exits.startswith("C"):
    found = f"{exits[0]!r} at index 0" if exits else "an empty string"
    raise ValueError(f"exits {exits!r} must start with 'C' (the stem), found {found}")
  if "C" in exits[1:]:
    raise ValueError(
        f"exits {exits!r} has a second 'C' at index {exits.index('C', 1)}; "
        "the stem comes once, first")
  if not exits.endswith("E"):
    raise ValueError(
        f"exits {exits!r} must end with 'E' (the final classifier), "
        f"found {exits[-1]!r} at index {len(exits) - 1}")
  if "EE" in exits:
    raise ValueError(
        f"exits {exits!r} has 'EE' at index {exits.index('EE')}: "
        "two exits at one point")
  num_blocks = exits.count("B")
  if num_blocks != num_stages:
    raise ValueError(
        f"exits {exits!r} has {num_blocks} 'B' (stages) but {model_name} has "
        f"{num_stages}; e.g. {'C' + 'B' * num_stages + 'E'!r} has no early exit")

  positions = []
  stage = 0
  for symbol in exits:
    if symbol == "B":
      stage += 1
    elif symbol == "E":
      positions.append(stage)
  return tuple(positions)
