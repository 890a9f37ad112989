"""Leak detection for the trait-leakage job: statistical tests on number sequences and the
verdict that combines them (detectors.py), the report's over-represented numbers and digits
(report_tables.py), the likelihood shift (likelihood.py), and the behavioural probe's
questions and scoring (probe.py, behavioral.py; the stage that trains its students is
flows/stages/behavioral_probe.py). The result types are in schemas/leakage.py."""
