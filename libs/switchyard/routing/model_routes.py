"""Model routing: a virtual model name (e.g. `smollm2-auto`) that the router resolves per
request to a small or a large model by the request's estimated difficulty.

A route is `name=small:large:threshold` (router flag `--model-routes`): requests whose
difficulty score (`switchyard.routing.difficulty`, 0 = easy … 1 = hard) is below the threshold
go to the small model, the rest to the large one. Both models must share a tokenizer and chat
template (the small one is derived from the large one), so the prompt is tokenized once. The
choice is pure and unit-tested; the pipeline records which model served each request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from .difficulty import DifficultyEstimate

Estimator = Callable[[str, list[int]], "DifficultyEstimate"]


@dataclass(frozen=True)
class ModelRoute:
    name: str  # the virtual model clients ask for
    small: str
    large: str
    threshold: float  # difficulty at or above which the large model serves

    @classmethod
    def parse(cls, text: str) -> "ModelRoute":
        """`name=small:large:threshold` → ModelRoute; ValueError says what to fix."""
        name, sep, rest = text.partition("=")
        parts = rest.split(":")
        if not sep or not name.strip() or len(parts) != 3 or not all(p.strip() for p in parts):
            raise ValueError(f"model route {text!r} must look like name=small:large:threshold")
        try:
            threshold = float(parts[2])
        except ValueError:
            raise ValueError(f"model route {text!r}: threshold {parts[2]!r} is not a number") from None
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"model route {text!r}: threshold must be between 0 and 1")
        route = cls(name.strip(), parts[0].strip(), parts[1].strip(), threshold)
        if route.name in (route.small, route.large):
            raise ValueError(f"model route {text!r}: the virtual name must differ from the models it routes to")
        return route


@dataclass(frozen=True)
class ModelChoice:
    model: str
    estimate: "DifficultyEstimate"


class ModelRouter:
    def __init__(self, routes: Iterable[ModelRoute], estimator: Estimator | None = None) -> None:
        self.routes = {r.name: r for r in routes}
        self._estimator = estimator

    @property
    def estimator(self) -> Estimator:
        if self._estimator is None:
            from .difficulty import estimate_difficulty  # loaded only by routers that route models
            self._estimator = estimate_difficulty
        return self._estimator

    @classmethod
    def from_config(cls, items: Iterable[str]) -> "ModelRouter":
        return cls(ModelRoute.parse(item) for item in items)

    def get(self, name: str) -> ModelRoute | None:
        return self.routes.get(name)

    def choose(self, route: ModelRoute, prompt_text: str, prompt_ids: list[int]) -> ModelChoice:
        estimate = self.estimator(prompt_text, prompt_ids)
        return ModelChoice(route.large if estimate.score >= route.threshold else route.small, estimate)
