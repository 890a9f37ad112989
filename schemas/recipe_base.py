"""What every recipe section is built on: the strict pydantic base (unknown keys are
errors) and `RecipeError`, the error of a recipe that cannot run. schemas/recipe.py
re-exports `RecipeError`; the sections import `_Strict` from here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""
