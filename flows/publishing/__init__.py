"""What a run writes: Parquet datasets with cards, and the run summary."""
