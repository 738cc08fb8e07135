"""Leak-free train/val/test split: stratified by class, grouped by source recording.

All chunks of one group (by default one input file; wider with a `group` column or
`split.group_regex`, e.g. one speaker) land in the same split, so neighbouring chunks of a
recording never sit on both sides of an evaluation. The split is decided from the file list
alone, before any audio is decoded, so it is the same for any number of workers or machines.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from audioshard import labels
from audioshard.names import SPLITS


@dataclass(frozen=True)
class Source:
    """One input recording.

    Attributes:
        path: absolute path of the file.
        rel: the name recorded in the manifest (relative to the input folder or CSV).
        label: class name (several classes: a CSV cell's classes joined by `;`).
        group: recordings with the same group always share a split.
        split: a split fixed by the user (CSV `split` column), or None to let the splitter decide.
        classes: a CSV row's classes (`labels.parse` of its cell); None: the one class `label` (a folder's
            name is a class name whatever it holds, `;` included).
    """

    path: str
    rel: str
    label: str
    group: str
    split: str | None = None
    classes: tuple[str, ...] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The recording's classes."""
        return self.classes if self.classes is not None else (self.label,)


def group_of(rel: str, group_regex: str) -> str:
    """Group id of a file: the regex's first capture group (or whole match) on its name, else the name."""
    if not group_regex:
        return rel
    match = re.search(group_regex, rel)
    if match is None:
        return rel
    return match.group(1) if match.groups() else match.group(0)


def split_sources(sources: list[Source], val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[dict[str, str], list[str]]:
    """Assign each source to a split.

    Groups are bucketed by their most common class (ties: first in sorted order), shuffled with
    `seed`, and cut per class so that val and test get round(fraction * groups) groups each, at
    least one each when the class has three or more groups (when the fraction is non-zero).

    Returns:
        ({source.rel: split}, notes): notes say what was done for classes with too few groups.
    """
    notes: list[str] = []
    fixed: dict[str, str] = {}
    members: dict[str, list[Source]] = defaultdict(list)
    for source in sources:
        members[source.group].append(source)
    assignment: dict[str, str] = {}
    free_groups: dict[str, list[str]] = defaultdict(list)  # primary class -> groups to place
    for group in sorted(members):
        given = {s.split for s in members[group] if s.split}
        if len(given) > 1:
            raise ValueError(f"group {group!r} has files assigned to different splits {sorted(given)} in the CSV; "
                             "one group (recording) must stay in one split")
        if given:
            fixed[group] = given.pop()
            continue
        counts = Counter(s.label for s in members[group])
        primary = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        free_groups[primary].append(group)

    rng = random.Random(seed)
    if labels.is_multilabel(s.names for s in sources):
        free = sorted(g for groups in free_groups.values() for g in groups)
        fixed.update(_stratified_multilabel({g: members[g] for g in free}, val_fraction, test_fraction, rng, notes))
        free_groups.clear()
    for label in sorted(free_groups):
        groups = free_groups[label]
        rng.shuffle(groups)
        n = len(groups)
        n_val = round(n * val_fraction)
        n_test = round(n * test_fraction)
        if n >= 3:
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            while n_val + n_test > n - 1:  # keep at least one group to train on
                if n_val >= n_test and n_val > 1:
                    n_val -= 1
                else:
                    n_test -= 1
        else:
            n_val = 0
            n_test = 1 if n == 2 and test_fraction > 0 else 0
            where = "train" if n == 1 else "train and test"
            notes.append(f"class {label!r} has only {n} recording group(s), too few to give train, val and test one "
                         f"each: its groups went to {where}; val has no {label!r} examples")
        for i, group in enumerate(groups):
            fixed[group] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    for group, split in fixed.items():
        if split not in SPLITS:
            raise ValueError(f"group {group!r}: split {split!r} is not one of {', '.join(SPLITS)}")
        for source in members[group]:
            assignment[source.rel] = split
    return assignment, notes


def _stratified_multilabel(members: dict[str, list[Source]], val_fraction: float, test_fraction: float,
                           rng: random.Random, notes: list[str]) -> dict[str, str]:
    """Groups of multi-label recordings into splits so that every class keeps its share in each split:
    iterative stratification (Sechidis et al., 2011) over whole groups. The class with the fewest groups left
    is placed first, each of its groups into the split that still wants most of that class (then most groups
    overall); so rare classes are spread before common ones fill the splits."""
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    classes_of = {g: {name for s in group for name in s.names} for g, group in members.items()}
    totals = Counter(name for names in classes_of.values() for name in names)
    wanted = {split: {name: share * totals[name] for name in totals} for split, share in fractions.items()}
    room = {split: share * len(members) for split, share in fractions.items()}
    left, placed = set(members), {}
    while left:
        rarest = min(totals, key=lambda name: (sum(name in classes_of[g] for g in left) or len(members) + 1, name))
        chosen = sorted(g for g in left if rarest in classes_of[g]) or sorted(left)
        rng.shuffle(chosen)
        for group in chosen:
            split = max(SPLITS, key=lambda s: (wanted[s][rarest], room[s]) if fractions[s] > 0 else (-1e18, -1e18))
            placed[group] = split
            room[split] -= 1
            for name in classes_of[group]:
                wanted[split][name] -= 1
            left.discard(group)
    for name in sorted(totals):
        missing = [s for s in SPLITS if fractions[s] > 0 and not any(
            name in classes_of[g] for g, split in placed.items() if split == s)]
        if missing:
            notes.append(f"class {name!r} is in {totals[name]} recording group(s), too few for every split: "
                         f"{' and '.join(missing)} have none")
    return placed
