"""ganns-async: a classroom trains one DCGAN on CelebA through PostgreSQL LISTEN/NOTIFY."""

__version__ = "0.1.0"
