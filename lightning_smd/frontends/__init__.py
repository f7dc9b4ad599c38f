"""The front ends over one :class:`~lightning_smd.engine.session.Session`: :class:`SMDCallback` for a Lightning
Trainer (the only module of the package that imports Lightning) and :class:`SMDMonitor` for a plain loop."""
