"""What a data folder held besides good images: the report a run or an evaluation gives
at its end (``DataReport``), kept in the train state across a resume.

Plain data, no torch or PIL: the train state and the CLI read it cheaply.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

FIRST_FEW = 5  # bad, ignored or skipped-link files named in a report
BAD_SHARE = 0.05  # a class with more unreadable files than this share is warned about


@dataclass
class DataReport:
    """Bad files skipped, non-image files ignored, links not followed, empty classes
    and classes with many bad files, for the end of a run.

    ``bad`` holds every distinct bad file with its reason; ``skipped`` counts the times
    a bad file was drawn and replaced (training) or dropped (evaluation): it is met
    again every epoch. ``links`` holds the symlinks the scan did not follow, with why.
    ``bad_share`` maps a class with more than ``BAD_SHARE`` of its files unreadable to
    ``[bad files, files]``.
    """

    bad: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    ignored: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    bad_share: dict[str, list[int]] = field(default_factory=dict)

    def add_skipped(self, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Count the bad files drawn (each one a skipped sample); return those not seen
        before."""
        self.skipped += len(skipped)
        return self.add_bad(skipped)

    def add_bad(self, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Record bad files met while looking for a replacement (not counted as skipped
        samples); return those not seen before."""
        new = [(p, r) for p, r in dict(found).items() if p not in self.bad]
        self.bad.update(new)
        return new

    def merge(self, other: "DataReport") -> "DataReport":
        self.bad.update((p, r) for p, r in other.bad.items() if p not in self.bad)
        self.skipped += other.skipped
        known = set(self.ignored)
        self.ignored += [p for p in other.ignored if p not in known]
        self.empty_classes += [c for c in other.empty_classes if c not in self.empty_classes]
        self.links.update((p, r) for p, r in other.links.items() if p not in self.links)
        for name, (bad, total) in other.bad_share.items():
            mine = self.bad_share.get(name, [0, total])
            self.bad_share[name] = [max(mine[0], bad), total]
        return self

    def __bool__(self) -> bool:
        return bool(self.bad or self.ignored or self.empty_classes or self.links)

    def to_dict(self) -> dict:
        """Counts and the first few files: the report in a run's result and ``--json``."""
        return {"bad_files": len(self.bad), "skipped_samples": self.skipped,
                "first_bad": [{"path": p, "reason": r} for p, r in itertools.islice(self.bad.items(), FIRST_FEW)],
                "ignored_files": len(self.ignored), "first_ignored": self.ignored[:FIRST_FEW],
                "empty_classes": list(self.empty_classes),
                "skipped_links": len(self.links),
                "first_skipped_links": [{"path": p, "reason": r}
                                        for p, r in itertools.islice(self.links.items(), FIRST_FEW)],
                "bad_share": {k: list(v) for k, v in self.bad_share.items()}}

    def to_state(self) -> dict:
        """Everything, as plain data (kept in the train state across a resume)."""
        return {"bad": dict(self.bad), "skipped": self.skipped, "ignored": list(self.ignored),
                "empty_classes": list(self.empty_classes), "links": dict(self.links),
                "bad_share": {k: list(v) for k, v in self.bad_share.items()}}

    @classmethod
    def from_state(cls, d: dict) -> "DataReport":
        """The report ``to_state`` wrote; a ``ValueError`` names what is malformed."""
        if not isinstance(d, dict):
            raise ValueError("the data report is not a mapping")
        report = cls(_str_map(d.get("bad", {}), "bad"), int(d.get("skipped", 0)),
                     _str_list(d.get("ignored", []), "ignored"),
                     _str_list(d.get("empty_classes", []), "empty_classes"),
                     _str_map(d.get("links", {}), "links"))
        share = d.get("bad_share", {})
        if not isinstance(share, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) for n in v)
                for v in share.values()):
            raise ValueError("bad_share is not a mapping of class to [bad, files]")
        report.bad_share = {str(k): list(v) for k, v in share.items()}
        if report.skipped < 0:
            raise ValueError("skipped is negative")
        return report

    def lines(self) -> list[str]:
        return report_lines(self.to_dict())


def _str_map(v, name: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()):
        raise ValueError(f"{name} is not a mapping of path to reason")
    return dict(v)


def _str_list(v, name: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
        raise ValueError(f"{name} is not a list of paths")
    return list(v)


def _first(items: list[str], total: int) -> str:
    more = f" and {total - len(items)} more" if total > len(items) else ""
    return f"{'; '.join(items)}{more}"


def report_lines(d: dict) -> list[str]:
    """A report (``DataReport.to_dict()``) as a few human lines; none for clean data."""
    out = []
    if d.get("bad_files"):
        first = [f"{b['path']} ({b['reason']})" for b in d["first_bad"]]
        out.append(f"{d['bad_files']} unreadable image file(s) skipped ({d['skipped_samples']} "
                   f"time(s) in all; --strict stops instead): {_first(first, d['bad_files'])}")
    for name, (bad, total) in (d.get("bad_share") or {}).items():
        out.append(bad_share_line(name, bad, total))
    if d.get("ignored_files"):
        first = ", ".join(d["first_ignored"])
        more = f" and {d['ignored_files'] - len(d['first_ignored'])} more" if d["ignored_files"] > len(d["first_ignored"]) else ""
        out.append(f"{d['ignored_files']} file(s) ignored, not images by name: {first}{more}")
    if d.get("skipped_links"):
        first = [f"{b['path']} ({b['reason']})" for b in d["first_skipped_links"]]
        out.append(f"{d['skipped_links']} symlink(s) not followed: {_first(first, d['skipped_links'])}")
    if d.get("empty_classes"):
        out.append(f"class folder(s) without images: {', '.join(d['empty_classes'])} "
                   "(they keep their label index: labels follow folder names)")
    return out


def bad_share_line(name: str, bad: int, total: int) -> str:
    return (f"class {name}: {bad} of {total} file(s) ({100 * bad / max(total, 1):.0f}%) are "
            f"unreadable; each is replaced by a random readable image of the class, so those "
            "few are seen more often. Clean the folder, or pass --strict to stop at a bad file")
