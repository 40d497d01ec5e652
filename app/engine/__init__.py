"""The engine: runs recipes. Orders what the targets need with networkx, caches pure outputs,
streams events, and hosts all of it in a long-lived worker process the editor talks to."""
