"""mirrorfs daemons."""
