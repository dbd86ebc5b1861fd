"""One module per ``npos`` command; each exposes ``command`` (a click command or group)."""
