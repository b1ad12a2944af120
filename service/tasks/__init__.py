"""Follow-up tasks: a FHIR Task per exam needing follow-up and per receiving authority.

- ``classes``: which classifications need follow-up and when they fall due;
- ``transitions``: the Task.status state machine (pure);
- ``repository``: SQL on ``followup_tasks`` / ``followup_transfers`` only;
- ``resource``: the Task resource, written encrypted under the migrant's key;
- ``service``: the rules (creation on disclosure, withdrawal, updates, transfer, overdue);
- ``notify``: the one place a task event goes out (``task_event``);
- ``endpoints``: the HTTP routes.
"""
