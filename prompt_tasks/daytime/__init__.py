"""Work done outside a visit's minute: catch-up of failed detector-visits, raw calibrations, reports.

- :mod:`.catchup`: redo failed detector-visits in the daytime window;
- :mod:`.calibration`: calibration exposures with no announced visit, ingested and verified;
- :mod:`.report`: a visit's timeline, drawn from the ledger.
"""
