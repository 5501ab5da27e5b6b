"""The I/O edge: the ASGI app, the upstream HTTP client, health probers and the server's root nursery."""
