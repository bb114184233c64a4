"""The base layer: architecture registry, configs, artifacts, safe model loading, data, generation, scoring."""
