"""Transports for multifd, registered with ``engine.transport`` by URI scheme.

Importing a module here registers its scheme; the engine imports ``tcp`` and
``unix`` on first use of ``tcp://`` or ``unix://``.
"""
