"""Experiments on top of the bdvax_lab library: reproduce presets, the demo, the bench, the pool builder.

Not installed with the library.
"""
