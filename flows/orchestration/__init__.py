"""Prefect around the flows: deployments for work pools, and what every flow run shares."""
