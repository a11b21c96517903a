"""The prediction server (``recmem serve``): a bundle behind HTTP, swapped live when its registry
alias moves or a delta arrives.

``service.py`` answers requests (transport-free), ``http.py`` is the embedded HTTP front,
``source.py`` finds the bundle (a folder, or a registry alias it follows), ``metrics.py`` counts,
``limits.py`` bounds requests, ``run.py`` is the command. Nothing is imported here, so that the CLI
can read :class:`~recmem.serve.limits.Limits` without torch. The Ray Serve deployment for replicas
is ``deploy/serve/``.
"""
