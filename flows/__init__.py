"""Prefect flows: they only wire tasks and subflows."""

from medflow.settings import enable_project_logs

enable_project_logs()
