"""A finding: something wrong that a check found, naming the object, file or row."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Finding:
    """`subject` names the object, file or row; `problem` says what is wrong with it."""

    subject: str
    problem: str
    severity: str = "error"  # error | warning

    def as_dict(self) -> dict[str, str]:
        return {"subject": self.subject, "problem": self.problem, "severity": self.severity}

    def __str__(self) -> str:
        return f"{self.subject}: {self.problem}"
