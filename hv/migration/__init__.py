"""Live migration: wire protocol, sender, receiver."""
