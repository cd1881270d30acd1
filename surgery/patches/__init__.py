"""Importing this package registers every built-in patch in `surgery.patch.PATCHES`."""

from surgery.patches import attention, gqa, rope  # noqa: F401
