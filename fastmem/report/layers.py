"""Which probe points a report shows: one row or column per distinct embedding."""

from __future__ import annotations

from collections.abc import Sequence


def distinct_layers(layers: Sequence[str]) -> list[tuple[str, str]]:
    """(probe point, shown name) once per distinct embedding: h is the global average pool of the last encoder block,
    the same vector as that block's probe, so the two are one entry named `h (= stage4)`."""
    if "h" not in layers or list(layers).index("h") == 0:
        return [(name, name) for name in layers]
    last_block = layers[list(layers).index("h") - 1]
    return [(name, f"h (= {last_block})" if name == "h" else name) for name in layers if name != last_block]
