"""Leak detection for the trait-leakage job: statistical tests on number sequences, the
likelihood shift, the behavioural probe, and the verdict that combines them."""
