"""Prefect flows: they only wire tasks and subflows."""
