"""bdvax."""
