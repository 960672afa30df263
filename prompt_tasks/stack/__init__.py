"""The embedded local stack: private servers and the fleet's processes on loopback."""
