"""Prefect @flow functions: one per pipeline and one per stage."""
