"""Somebody else's Lightning diffusion project: its own module and datamodule (no module, datamodule or CLI of
ours), plugged into the attribution tools through the protocol of ``attribution/protocol.py`` only. The lines
marked ``# protocol`` are all the glue it needs."""
