"""Model architectures, the registry of served models, and checkpoint loading."""
