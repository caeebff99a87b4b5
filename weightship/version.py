"""The version of weightship: one place, imported by the modules that report it."""

__version__ = "0.1.0"
