"""Recipes: verdict thresholds per product, chosen per request by ``recipe_id``.

A recipe file (``S2AMNET_RECIPES``, YAML or JSON) maps recipe ids to a version and, per model, the verdict rule
that replaces the model's own for parts of that recipe (any key left out keeps the manifest's value)::

    recipes:
      housing-A7:
        version: "2026-11-03"
        on_timeout: fail              # optional: the default of `on_timeout` for this recipe's requests
        models:
          neu-det-detect:
            min_score: 0.4            # every class not listed below
            min_area: 50              # pixels of the original image
            classes:
              crazing: {min_score: 0.1}
              scratches: {min_score: 0.3, min_area: 200}
          mt-classify:
            pass_labels: [MT_Free]
            min_score: 0.35

A request naming a recipe is decided by that recipe's rule for the request's model (the manifest's rule for a
model the recipe does not list) and its result says so: ``"recipe": {"id", "version"}``. An unknown id is a
422. The file is read again on SIGHUP or when it changes; a new file is validated as a whole (syntax, fields,
class names of the loaded models) before it replaces the old one: a bad file is logged, counted
(``s2amnet_recipe_reloads_total{outcome="invalid"}``) and ignored, never half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app import metrics
from app.errors import Problem

if TYPE_CHECKING:
    from model.predictor import Predictor

log = logging.getLogger("s2amnet.recipes")

POLL_S = 1.0  # how often the file's modification time is checked


class ClassRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_score: float | None = Field(None, ge=0.0, le=1.0)
    min_area: float | None = Field(None, ge=0.0)


class ModelRule(BaseModel):
    """A verdict rule for one model; keys left out keep the model's (manifest) values."""

    model_config = ConfigDict(extra="forbid")

    min_score: float | None = Field(None, ge=0.0, le=1.0)
    min_area: float | None = Field(None, ge=0.0)
    classes: dict[str, ClassRule] = Field(default_factory=dict)
    pass_labels: list[str] | None = None

    def over(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """This rule over ``base`` (the manifest's rule): per-class entries replace the base's class entries."""
        rule = dict(base)
        for key in ("min_score", "min_area", "pass_labels"):
            value = getattr(self, key)
            if value is not None:
                rule[key] = value
        if self.classes:
            rule["classes"] = {name: c.model_dump(exclude_none=True) for name, c in self.classes.items()}
        return rule


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(..., min_length=1, max_length=128)
    description: str | None = None
    on_timeout: Literal["error", "fail"] | None = None
    models: dict[str, ModelRule] = Field(default_factory=dict)


class RecipeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipes: dict[str, Recipe]


@dataclass(frozen=True)
class Decision:
    """What decides one request's verdicts: the rule (None = the model's own), the recipe that gave it
    (``{"id", "version"}`` or None) and the request's on_timeout."""

    rule: dict[str, Any] | None = None
    recipe: dict[str, str] | None = None
    on_timeout: str = "error"


class RecipeError(ValueError):
    """A recipe file that cannot be used (with the reason)."""


def read_recipes(path: Path, predictors: Mapping[str, Predictor] | None = None) -> dict[str, Recipe]:
    """Parse and validate a recipe file; rules are checked against the loaded ``predictors`` (class names).
    Raises RecipeError with every problem found."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read {path}: {exc}") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}") \
            from None
    if not isinstance(raw, dict) or "recipes" not in raw:
        raise RecipeError(f"{path}: expected a mapping with a 'recipes' key (recipe id -> version, models)")
    try:
        recipes = RecipeFile.model_validate(raw).recipes
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"{path}: {problems}") from None
    problems = []
    for rid, recipe in recipes.items():
        for name, model_rule in recipe.models.items():
            predictor = (predictors or {}).get(name)
            if predictor is None:
                continue  # a model this process does not serve: checked where it is loaded
            try:
                predictor.rule(model_rule.over(predictor.verdict_rule))
            except ValueError as exc:
                problems.append(f"recipes.{rid}.models.{name}: {exc}")
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))
    return recipes


class RecipeBook:
    """The recipes in force, reloaded from their file on SIGHUP or when it changes."""

    def __init__(self, path: Path | None, predictors: Mapping[str, Predictor] | None = None):
        self.path = path
        self.predictors = predictors
        self.recipes: dict[str, Recipe] = {}
        self._stamp: tuple[float, int] | None = None
        self._watch: asyncio.Task | None = None

    def load(self) -> None:
        """Read the file now: raises RecipeError (start-up refuses a bad file; reloads keep the old one)."""
        if self.path is None:
            return
        for outcome in ("ok", "invalid"):  # both series from the start: rate()/increase() see the first event
            metrics.RECIPE_RELOADS.labels(outcome=outcome)
        stamp = self._file_stamp()
        self.recipes = read_recipes(self.path, self.predictors)
        self._stamp = stamp
        metrics.RECIPE_RELOADS.labels(outcome="ok").inc()
        log.info("recipes: %d from %s (%s)", len(self.recipes), self.path,
                 ", ".join(f"{k} v{r.version}" for k, r in sorted(self.recipes.items())) or "none")

    def reload(self) -> bool:
        """Read the file again; a bad file is logged and counted, and the recipes in force stay. True if replaced."""
        try:
            self.load()
            return True
        except RecipeError as exc:
            self._stamp = self._file_stamp()  # do not retry the same bad file every poll
            metrics.RECIPE_RELOADS.labels(outcome="invalid").inc()
            log.error("recipes not reloaded, the previous ones stay in force: %s", exc)
            return False

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (st.st_mtime, st.st_size) if st else None

    async def watch(self) -> None:
        """Reload on SIGHUP (main thread's loop only) and whenever the file's modification time or size changes."""
        if self.path is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._watch = asyncio.create_task(self._poll(), name="s2amnet-recipes")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if self._file_stamp() != self._stamp:
                self.reload()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def decide(self, recipe_id: str | None, predictor: Predictor, on_timeout: str | None = None) -> Decision:
        """The Decision for a request naming ``recipe_id`` (or none) on ``predictor``; 422 for an unknown id."""
        if recipe_id is None:
            return Decision(on_timeout=on_timeout or "error")
        recipe = self.recipes.get(recipe_id)
        if recipe is None:
            known = ", ".join(sorted(self.recipes)[:20]) or "none configured (S2AMNET_RECIPES)"
            raise Problem(422, "unknown_recipe", f"no recipe {recipe_id!r} (recipes: {known})",
                          title="Unknown recipe")
        model_rule = recipe.models.get(predictor.name)
        rule = model_rule.over(predictor.verdict_rule) if model_rule is not None else None
        return Decision(rule=rule, recipe={"id": recipe_id, "version": recipe.version},
                        on_timeout=on_timeout or recipe.on_timeout or "error")
