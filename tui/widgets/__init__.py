"""The terminal UI's widgets: nodes table, layer map, event log, chat log."""
