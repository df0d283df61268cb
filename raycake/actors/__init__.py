"""Thin Ray actors over engine/, policies/ and transfer/."""
