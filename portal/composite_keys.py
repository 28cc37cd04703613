"""Foreign keys over two columns, for migrations: (row's parent, row's organization) -> the
parent's (id, organization). One check per inserted row enforces both that the parent exists and
that it belongs to the row's own organization. Django models single-column foreign keys only, so
these are PostgreSQL's own (SQLite, the embedded default, has no concurrent writers to stop).
"""

from django.db import migrations


def composite_foreign_key(*, table: str, name: str, column: str, parent_table: str) -> migrations.RunPython:
    add = (f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column}, organization_id) "
           f"REFERENCES {parent_table} (id, organization_id) DEFERRABLE INITIALLY DEFERRED")
    drop = f"ALTER TABLE {table} DROP CONSTRAINT {name}"

    def run(sql):
        def on_postgresql(apps, schema_editor):
            if schema_editor.connection.vendor == "postgresql":
                schema_editor.execute(sql)
        return on_postgresql

    return migrations.RunPython(run(add), run(drop))
