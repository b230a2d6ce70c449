"""Experiment families: a config (``experiments/<family>/``) plus one function that expands it into runs."""
