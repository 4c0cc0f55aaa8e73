"""Portcullis: a before-queue SMTP gate for a mail-gateway appliance."""

__version__ = "0.1.0"
