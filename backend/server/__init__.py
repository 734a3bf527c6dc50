"""The shared GPU server (``python -m backend cluster-serve``) on Ray Serve: Blender's Remote backend over HTTP.

- ``main``: the command: checks, the token, Ray, deploying the application, stopping it;
- ``front``: the public port: header, body and idle timeouts, the token before the body, a cap on connections
  without it; passes each request to Serve's proxy on 127.0.0.1;
- ``app``: the application: the ingress (token on every request, limits, the queue) and the GPU replicas;
- ``requests``: what a request may be, checked before any work;
- ``token``: the server's token (made once, kept in a file only its owner reads, compared by digest).

May import the engine (``pipeline``, ``worker``'s job loop, ``models``), ``protocol`` and ``options``; never the client.
"""
