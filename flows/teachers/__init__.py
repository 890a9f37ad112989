"""The roles that answer problems: the DualDistill teachers, the self-distillation student, and what builds them from a recipe."""
