"""Named kinds that are their value wherever they go.

A kind (an input format, a classifier's problem type) is stored in config files, manifests and job files as a
string, and compared with strings read from them. A member of a `Kind` enum is that string for every purpose:
equal to it, hashed as it (a dict keyed by "csv" finds Format.CSV), shown and formatted as it, and written by
json as it. enum.StrEnum does this from Python 3.11 on, except the hash; this runs on 3.10 too.
"""

from __future__ import annotations

import enum


class Kind(str, enum.Enum):
    __hash__ = str.__hash__  # an Enum hashes its name; as a key it must be its value

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
