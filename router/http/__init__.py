"""The router's HTTP server: hypercorn's trio worker serving with the router's own connection
classes (router/http/serve.py). Used by the router (router/net) and the simulated workers
(router/sim); it imports nothing else of the router."""
