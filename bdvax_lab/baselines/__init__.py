"""Other defences and controls, each in its own module with one ``register_defence`` call.

:func:`defend` runs one by name and evaluates it like :func:`bdvax_lab.purify`; :func:`defences` lists them.
Importing this package is light: the defences load on first use.
"""

from __future__ import annotations
