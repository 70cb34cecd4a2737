"""The text: the LibreOffice-help parallel corpus (and its builder), FLORES+, and the language table."""
