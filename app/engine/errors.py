"""Exceptions the engine and node implementations share."""


class Cancelled(Exception):
    """Raised at a cancellation check after the user asked to stop."""


class NodeError(Exception):
    """A node failed in a way the user can act on; the message names the file or setting."""
