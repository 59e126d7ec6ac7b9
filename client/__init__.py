"""forvalue.client: the Python client of the influence service and the `forvalue` command line.

client.py holds `InfluenceClient` (the calls of the in-process `Index`, over gRPC; torch-free), cli.py the
click commands, render.py what they print (text, JSON, colours), report.py the HTML reports.

`from forvalue.client import InfluenceClient` imports the client on first use, so the CLI's `--help`
stays instant.
"""


def __getattr__(name: str):
    if name in ("InfluenceClient", "ServerError"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
