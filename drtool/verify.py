"""Verification: the repository's integrity (and, with --drill, a restore into scratch space).

Layer 1 (every run): every object a manifest references exists with its recorded size.
With --read-data[=FRACTION]: packs are downloaded and every blob hashed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from drtool.progress import Progress
from drtool.repo.base import Finding, Manifest, Repository

log = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    snapshots: list[Manifest]
    read_fraction: float
    findings: list[Finding] = field(default_factory=list)
    drill: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not [f for f in self.findings if f.severity == "error"]

    def as_dict(self) -> dict[str, Any]:
        out = {"ok": self.ok, "snapshots": [s.id for s in self.snapshots], "read_data": self.read_fraction,
               "findings": [f.as_dict() for f in self.findings]}
        if self.drill is not None:
            out["drill"] = self.drill
        return out


def verify(repo: Repository, snapshots: list[Manifest], read_fraction: float = 0.0) -> VerifyResult:
    result = VerifyResult(snapshots, read_fraction)
    with Progress("verify") as progress:
        result.findings.extend(repo.check(snapshots, read_fraction, progress))
    return result
