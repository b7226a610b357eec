"""Particle I/O: MRC stacks, RELION STAR tables, lazy image sources and atomic writers."""

from cryosift.io.atomic import atomic_path, atomic_write_json, atomic_write_text, temp_path_for
from cryosift.io.mrc import (
    MrcInfo,
    MrcsWriter,
    memmap_stack,
    open_mrc_stack,
    read_mrc_info,
    write_mrcs,
)
from cryosift.io.source import (
    ArraySource,
    ImageSource,
    MrcStackSource,
    StarSource,
    open_source,
)
from cryosift.io.star import (
    ParticleTable,
    image_names,
    make_optics_table,
    merged_metadata,
    parse_image_name,
    pixel_size_of,
    read_star,
    rebase_image_columns,
    split_image_names,
    write_star,
)

__all__ = [
    "ArraySource",
    "ImageSource",
    "MrcInfo",
    "MrcStackSource",
    "MrcsWriter",
    "ParticleTable",
    "StarSource",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "image_names",
    "make_optics_table",
    "memmap_stack",
    "merged_metadata",
    "open_mrc_stack",
    "open_source",
    "parse_image_name",
    "pixel_size_of",
    "read_mrc_info",
    "read_star",
    "rebase_image_columns",
    "split_image_names",
    "temp_path_for",
    "write_mrcs",
    "write_star",
]
