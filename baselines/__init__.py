"""Built-in merge methods, registered through the ``mergebench.methods`` entry-point group
exactly like third-party plugins (see ``pyproject.toml``)."""
