"""Runtime shared by the three Conveyor services: logging, server bootstrap,
client channels, default ports and the local stack runner."""
