"""Importing this package registers every built-in patch in `surgery.patch.PATCHES`."""

from surgery.patches import attention, gqa, kv_cache, mla, rope, sliding_window  # noqa: F401
