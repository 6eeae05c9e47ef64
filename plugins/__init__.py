"""Built-in sslcli methods, installed as ``sslcli_plugins``."""
