"""Running model-written code: the sandbox."""
