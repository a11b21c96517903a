"""Evolutionary search over per-field widths (OptEmbed-D's phase 2, after Guo et al.'s single-path
one-shot search): deterministic for a seed, resumable after any generation.

A candidate is a tuple of F widths, each in 1..D. Generation 0 draws ``population`` random
candidates; each later generation takes the ``top_k`` best candidates scored so far as parents and
adds ``mutations`` children (a random parent, each width redrawn with probability
``mutation_prob``) and ``crossovers`` children (two random parents, each width taken from either
with equal chance). A child not ``allowed`` (over a memory limit) is repaired: its widest width
lowered by one until it is (:func:`repair`); a child already scored is drawn again, at most
:data:`TRIES` times per child. Generation g draws from a generator seeded by (seed, g)
alone, so a search resumed after generation g continues exactly as an uninterrupted one.
Ties in score go to the candidate scored first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

Candidate = tuple[int, ...]

TRIES = 100
"""Draws per child before a generation settles for fewer children."""


@dataclass
class SearchSettings:
    """The search's knobs (see the module docstring)."""

    population: int = 20
    top_k: int = 15
    mutations: int = 10
    crossovers: int = 10
    mutation_prob: float = 0.1
    iterations: int = 30
    seed: int = 0


@dataclass
class SearchState:
    """Scores so far, in the order candidates were scored, and the last finished generation (-1: none)."""

    generation: int = -1
    scores: dict[Candidate, float] = field(default_factory=dict)

    def best(self) -> tuple[Candidate, float]:
        """The best candidate and its score (the first scored among equals)."""
        return max(self.scores.items(), key=lambda kv: kv[1])

    def ranked(self) -> list[Candidate]:
        """Candidates best first (the first scored among equals)."""
        order = sorted(enumerate(self.scores.items()), key=lambda item: (-item[1][1], item[0]))
        return [cand for _, (cand, _) in order]

    def save(self, path: Path) -> None:
        """Write as JSON atomically."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"generation": self.generation,
                                   "scores": [[list(c), s] for c, s in self.scores.items()]}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, num_fields: int, dim: int) -> "SearchState":
        """Read a saved state for F fields of widths 1..D.

        Raises:
            ValueError: naming the file: not JSON of a state, or candidates of another shape.
        """
        try:
            data = json.loads(path.read_text())
            scores = {tuple(int(w) for w in c): float(s) for c, s in data["scores"]}
            generation = int(data["generation"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a search state ({e})") from None
        if any(len(c) != num_fields or not all(1 <= w <= dim for w in c) for c in scores):
            raise ValueError(f"{path}: holds candidates that are not {num_fields} widths in 1..{dim}")
        return cls(generation, scores)


def evolve(num_fields: int, dim: int, score: Callable[[Candidate], float], settings: SearchSettings,
           allowed: Callable[[Candidate], bool] = lambda c: True, state: SearchState | None = None,
           after_generation: Callable[[SearchState], None] = lambda s: None) -> SearchState:
    """Run (or continue) the search; ``after_generation`` sees the state after each generation.

    Raises:
        ValueError: generation 0 found no allowed candidate.
    """
    state = state or SearchState()
    generator = torch.Generator()
    for generation in range(state.generation + 1, settings.iterations + 1):
        generator.manual_seed(settings.seed * 1_000_003 + generation)
        if generation == 0:
            children = [_draw(lambda: _random(num_fields, dim, generator), state, allowed)
                        for _ in range(settings.population)]
        else:
            parents = state.ranked()[:settings.top_k]
            children = [_draw(lambda: _mutate(_pick(parents, generator), dim, settings.mutation_prob, generator),
                              state, allowed) for _ in range(settings.mutations)]
            children += [_draw(lambda: _cross(_pick(parents, generator), _pick(parents, generator), generator),
                               state, allowed) for _ in range(settings.crossovers)]
        for child in children:
            if child is not None and child not in state.scores:
                state.scores[child] = score(child)
        if not state.scores:
            raise ValueError(f"no allowed candidate among {TRIES * settings.population} random ones")
        state.generation = generation
        after_generation(state)
    return state


def _draw(make: Callable[[], Candidate], state: SearchState, allowed: Callable[[Candidate], bool]) -> Candidate | None:
    for _ in range(TRIES):
        child = repair(make(), allowed)
        if child is not None and child not in state.scores:
            return child
    return None


def repair(candidate: Candidate, allowed: Callable[[Candidate], bool]) -> Candidate | None:
    """``candidate`` if allowed, else its widest width (the first of equals) lowered by one until
    it is; None when all ones are not allowed either."""
    widths = list(candidate)
    while not allowed(tuple(widths)):
        widest = max(range(len(widths)), key=lambda f: (widths[f], -f))
        if widths[widest] == 1:
            return None
        widths[widest] -= 1
    return tuple(widths)


def _random(num_fields: int, dim: int, generator: torch.Generator) -> Candidate:
    return tuple(torch.randint(1, dim + 1, (num_fields,), generator=generator).tolist())


def _pick(parents: list[Candidate], generator: torch.Generator) -> Candidate:
    return parents[int(torch.randint(len(parents), (1,), generator=generator))]


def _mutate(parent: Candidate, dim: int, prob: float, generator: torch.Generator) -> Candidate:
    redraw = torch.rand(len(parent), generator=generator) < prob
    fresh = torch.randint(1, dim + 1, (len(parent),), generator=generator)
    return tuple(int(f) if r else p for p, f, r in zip(parent, fresh, redraw))


def _cross(a: Candidate, b: Candidate, generator: torch.Generator) -> Candidate:
    take_a = torch.rand(len(a), generator=generator) < 0.5
    return tuple(x if t else y for x, y, t in zip(a, b, take_a))
