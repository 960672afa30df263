"""The embedded local stack: private servers and the fleet's processes on loopback.

- :mod:`.servers`: Redis and the S3 gateway, started on free loopback ports;
- :mod:`.process`: one supervised process with its pid file and log;
- :mod:`.components`: every component of the stack and the order they start in;
- :mod:`.launcher`: ``stack up/status/down``;
- :mod:`.health`: what "healthy" means for each component;
- :mod:`.env`: the settings as environment variables for child processes (and the README table).
"""
