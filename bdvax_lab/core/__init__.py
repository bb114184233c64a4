"""The base layer: the architecture registry, configs, artifacts, safe loading, data, generation, scoring."""
