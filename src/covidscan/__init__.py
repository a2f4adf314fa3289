"""covidscan: COVID-19 detection in chest CT slices and chest X-rays, evaluated honestly."""

import pandas as pd

__version__ = "0.1.0"

# pandas 3 stores text columns in Arrow whenever pyarrow is installed (Ray, the `ray` extra, brings it),
# and Arrow text must be valid UTF-8: a file name that is not (kept by Python as surrogate escapes, e.g.
# b"\xff.png") then fails in every table covidscan builds. Python storage keeps any file name.
pd.set_option("mode.string_storage", "python")

CLASSES: tuple[str, str] = ("non_covid", "covid")
"""Class order used everywhere: index 0 is ``non_covid``, index 1 (the positive class) is ``covid``."""
