"""Pallas kernels (attention, SSD scan); see issue 6. Nothing is exported yet."""
