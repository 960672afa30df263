"""What the fleet talks about, as plain data with pure parsers: no I/O, no servers.

- :mod:`.visit`: the ``next_visit`` event (SAL ``logevent_nextVisit``), validated;
- :mod:`.status`: the status object every stage returns instead of raising;
- :mod:`.events`: bucket-notification bodies of every object store;
- :mod:`.objectkeys`: where a raw's instrument, detector, group and snap live in its object key;
- :mod:`.headers`: what a raw's FITS header or JSON sidecar says about it.
"""
