"""The DualDistill teachers and what builds them from a recipe."""
