"""The engine: detection of the normalized weights, the on-device recorder of every optimizer step, and the
:class:`~lightning_smd.engine.session.Session` that ties them to the analysis. torch, no Lightning."""
