"""forvalue.client: the Python client of the influence service and the `forvalue` command line.

`from forvalue.client import InfluenceClient` imports the client on first use, so the CLI's `--help`
stays instant.
"""


def __getattr__(name: str):
    if name in ("InfluenceClient", "ServerError"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
