"""Completion figures of the follow-up loop: counts per authority or clinic organization.

``period`` reads the reporting period, ``repository`` counts in SQL over the follow-up tasks,
``suppression`` applies the small-cell rule, ``measure_report`` and ``chart`` render what is left
as a FHIR MeasureReport and an SVG chart; ``endpoints`` and ``cli`` serve them. Nothing here
reads a record or a migrant's identity: the inputs are the task table's non-identifying columns.
"""
