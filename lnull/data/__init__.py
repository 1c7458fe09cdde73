"""Data sources, prompt templates and tokenisation."""
