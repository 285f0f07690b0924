"""Extra Balance: airtime advances for prepaid subscribers."""

__version__ = "0.1.0"
