"""Foreign keys over two columns, for migrations: (row's parent, row's organization) -> the
parent's (id, organization). One check per inserted row enforces both that the parent exists and
that it belongs to the row's own organization. Django models single-column foreign keys only, so
these are written in SQL.
"""

from django.db import migrations


def composite_foreign_key(*, table: str, name: str, column: str, parent_table: str) -> migrations.RunSQL:
    return migrations.RunSQL(
        f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column}, organization_id) "
        f"REFERENCES {parent_table} (id, organization_id) DEFERRABLE INITIALLY DEFERRED",
        reverse_sql=f"ALTER TABLE {table} DROP CONSTRAINT {name}",
    )
