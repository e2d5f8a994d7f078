"""Interop tests against the real seed libraries: shared helpers and peers.

The ``*_peer.py`` scripts here run a seed library (tinyproto, socket.engine,
esockets, litesockets) in a subprocess of its own; ``support`` starts them,
talks to them over pipes and records the bytes between them and trionet.
"""
