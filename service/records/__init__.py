"""The encrypted exam store: intake of FHIR resources, reads, history and search."""
