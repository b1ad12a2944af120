"""Key lifecycle use-cases: rotating and retiring the service's keys.

The KEK as operators run it: ``mhr keys rotate`` makes a new KEK version the one new wraps use;
``mhr keys rewrap`` re-wraps every subject key still under an older version, online, as
``keys.rewrap`` jobs (service.keys.rewrap_job); ``mhr keys status`` counts subject keys per KEK
version from the ``subjects.kek_version`` column (nothing is decrypted to find what is left);
``mhr keys retire --below N`` destroys the versions below N once nothing live needs them.
Together they are the KEK epochs by which an erasure reaches backups (SECURITY.md). The other
keys (access-token and audit log keys): secret_rotation, log_key_rotation.
"""
