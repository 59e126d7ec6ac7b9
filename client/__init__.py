"""forvalue.client: the Python client and the `forvalue` command line."""
