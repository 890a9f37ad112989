"""What a run reads besides the recipe: problems and prompt files."""
