"""Turning rows into what a reader sees: tables, figures, frontier views."""
