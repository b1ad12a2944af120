"""What a running service holds, built once at start-up from the settings and shared by
every request and job: the Runtime (database, key provider, validator, audit writer,
caches) and the CapabilityStatement.
"""
