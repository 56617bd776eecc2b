"""Pairwise judges: which of two images better shows a prompt. Both orders are asked to cancel position bias.

A multimodal model plugs in by implementing :class:`Judge.prefer`; the embedded domain's evaluator is the first
implementation (it counts how many of the prompt's attributes each image shows).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from PIL import Image

from studio.eval.domain import ATTRIBUTES, DomainEvaluator


@dataclass(frozen=True)
class Verdict:
    winner: str  # "A", "B" or "tie"
    first_order: str
    second_order: str


class Judge(ABC):
    """Compares two images for a prompt; subclasses answer one ordered question."""

    @abstractmethod
    def prefer(self, prompt: str, first: Image.Image, second: Image.Image) -> str:
        """"first", "second" or "tie" for the images in the order shown."""

    def compare(self, prompt: str, a: Image.Image, b: Image.Image) -> Verdict:
        """Ask in both orders; a winner must win both, otherwise it is a tie."""
        one = {"first": "A", "second": "B", "tie": "tie"}[self.prefer(prompt, a, b)]
        two = {"first": "B", "second": "A", "tie": "tie"}[self.prefer(prompt, b, a)]
        return Verdict(one if one == two else "tie", one, two)


class DomainJudge(Judge):
    """Prefers the image showing more of the prompt's attributes (the embedded domain's caption format)."""

    def __init__(self, evaluator: DomainEvaluator) -> None:
        self.evaluator = evaluator

    @staticmethod
    def expected(prompt: str) -> dict[str, str]:
        words = set(prompt.lower().replace(",", " ").split())
        return {name: value for name, values in ATTRIBUTES.items() for value in values if value in words}

    def prefer(self, prompt: str, first: Image.Image, second: Image.Image) -> str:
        expected = self.expected(prompt)
        scores = [sum(getattr(r, k) == v for k, v in expected.items()) for r in self.evaluator.read([first, second])]
        if scores[0] == scores[1]:
            return "tie"
        return "first" if scores[0] > scores[1] else "second"
