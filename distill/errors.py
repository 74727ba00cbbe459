"""One exception type for bad user input, so entry points can print it as a single line."""


class ConfigError(ValueError):
    """A configuration or input problem the user can fix.

    Messages follow one pattern: the field, the bad value, then the fix.
    """


def config_error(field: str, value: object, fix: str) -> ConfigError:
    """Build a ConfigError whose message names the field, the bad value and the fix."""
    return ConfigError(f"{field}={value!r}: {fix}")
