"""Adapters that add the contraction regulariser to other libraries' diffusion policies.

Each adapter works on the other library's objects by their attributes and call signatures; none of these modules
imports that library, so the package imports on the core install.
"""
