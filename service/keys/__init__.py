"""Key lifecycle use-cases: rotating and retiring the service's keys."""
