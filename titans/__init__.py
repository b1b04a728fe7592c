"""The `titans` command (cli.py): the outermost layer, over the engine and the server."""
