"""Adapter files on disk (PEFT's format) and atomic writes."""
