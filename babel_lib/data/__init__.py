"""The text: the LibreOffice-help parallel corpus (and its builder), FLORES+, the language table, and the zoo's
single-epoch pretraining tokens from Debian documentation packages (reader and builder)."""
