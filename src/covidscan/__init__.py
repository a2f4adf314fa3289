"""covidscan: COVID-19 detection in chest CT slices and chest X-rays, evaluated honestly."""

__version__ = "0.1.0"

CLASSES: tuple[str, str] = ("non_covid", "covid")
"""Class order used everywhere: index 0 is ``non_covid``, index 1 (the positive class) is ``covid``."""
