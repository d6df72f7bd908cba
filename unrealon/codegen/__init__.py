"""
Client generation: the OpenRPC document of the client API (from the server's
registry), and from it the typed TypeScript and Python clients.

``python -m unrealon.codegen`` writes everything under ``clients/``;
``python -m unrealon.codegen --check`` lists what differs from a fresh run
(CI).  See docs/clients.md.
"""
