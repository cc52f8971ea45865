"""The source formats, one module each, behind one registry: FORMATS[data.source] is that format's `SourceFormat`
(base.py), and each module's docstring holds the layout rules of its format. engine/data/sources.py dispatches
through the registry; engine/ray/readers.py keeps one Ray Data reader per file format under the same names, since
this package never imports ray (nor engine/data/images.py, which imports it).
"""

from __future__ import annotations

from engine.data.formats import digits, imagefolder, parquet, webdataset
from engine.data.formats.base import SourceFormat

# In the order of DataConfig.source's values.
FORMATS: dict[str, SourceFormat] = {f.name: f for f in (digits.FORMAT, parquet.FORMAT, imagefolder.FORMAT,
                                                          webdataset.FORMAT)}
FILE_SOURCES = tuple(name for name, f in FORMATS.items() if f.scan is not None)


def source_format(name: str) -> SourceFormat:
    if name not in FORMATS:
        raise ValueError(f"data.source={name!r} is not one of {', '.join(FORMATS)}")
    return FORMATS[name]
