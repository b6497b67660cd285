"""Prefect @task functions: thin, they resolve inputs, call the engine, and return artifact refs."""
