"""Erasure of one migrant by destroying their subject key (GDPR Art. 17), under a two-person rule.

- ``erase``: the use-case that destroys, in the caller's transaction (also used by key tooling);
- ``requests``: request and approval by two different admins, retention holds;
- ``receipt``: the signed erasure receipt handed to the submitting clinic;
- ``repository``: the SQL.
"""
