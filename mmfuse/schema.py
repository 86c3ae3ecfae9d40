"""What config dataclasses need, without importing OmegaConf (worker processes import configs, not the loader)."""

MISSING = "???"  # OmegaConf's marker for a required value


class ConfigError(ValueError):
    """A config the user wrote that cannot be used; the message names the key."""
