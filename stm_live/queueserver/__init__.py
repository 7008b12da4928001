"""stm-live under bluesky-queueserver: the startup profile of the RE Manager's worker.

``stm-live queue start --profile FILE`` (:mod:`stm_live.app.queue`) starts Redis and the RE
Manager with ``--startup-module stm_live.queueserver.startup``. In the worker process that module
builds, from the YAML profile, the microscope (``NanonisSTM``), a RunEngine and the session's
consumers through the one wiring (:func:`stm_live.session.build_consumers`: journal, tiled,
live reconstruction, tip monitor and policy), and exposes the plans with typed parameters the
queue server validates (:mod:`stm_live.queueserver.plans`).
"""
