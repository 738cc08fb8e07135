"""Several sounds in one recording: a label cell may name several classes, separated by `;`.

    path,label,group
    clips/a.wav,drone;speech,video1

A build is multi-label when any recording has more than one class; then each chunk carries a multi-hot
row (`labels.npy` beside `label.npy`, which keeps the first class for readers that know one label only),
the split keeps every class's share (iterative stratification) and training uses one sigmoid per class.
A build in which every recording has one class is single-label and is built exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SEPARATOR = ";"


def parse(cell: str) -> tuple[str, ...]:
    """The classes of one label cell, in the order given, without blanks or repeats."""
    names = (name.strip() for name in cell.split(SEPARATOR))
    return tuple(dict.fromkeys(name for name in names if name))


def joined(cell: str) -> str:
    """The label cell as the manifest records it: its classes joined by `;` (a one-class cell unchanged)."""
    return SEPARATOR.join(parse(cell))


def class_names(recordings: Iterable[tuple[str, ...]]) -> list[str]:
    """Every class of any recording (each given as its tuple of classes), sorted: for single-label data the
    sorted distinct labels, as before."""
    return sorted({name for names in recordings for name in names})


def is_multilabel(recordings: Iterable[tuple[str, ...]]) -> bool:
    return any(len(names) > 1 for names in recordings)


def multi_hot(names: tuple[str, ...], class_index: dict[str, int]) -> np.ndarray:
    """(classes,) uint8: 1 for each of the classes."""
    row = np.zeros(len(class_index), np.uint8)
    row[[class_index[name] for name in names]] = 1
    return row
