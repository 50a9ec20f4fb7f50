"""Serving many adapters over one base model: registry, mixed-batch generation engine, HTTP server."""
