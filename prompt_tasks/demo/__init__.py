"""The main job, ``prompt-tasks demo``: the embedded stack up, checked, and a simulated night played.

- :mod:`.run`: the demo's state and steps (shared by the two modules below);
- :mod:`.steps`: bring the stack up, PUT a raw, see its event arrive, check health;
- :mod:`.night`: SimCam's central repo and a short night against the running stack.
"""
