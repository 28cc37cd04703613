import django.db.models.deletion
from django.db import migrations, models


def route_existing_models_to_a_sandbox(apps, schema_editor):
    # Models created before provider connections existed are served by the organization's
    # sandbox until an admin points them at a real provider.
    CatalogModel = apps.get_model("allowances", "CatalogModel")
    ProviderConnection = apps.get_model("gateway", "ProviderConnection")
    for organization_id in CatalogModel.objects.values_list("organization_id", flat=True).distinct():
        sandbox, _ = ProviderConnection.objects.get_or_create(
            organization_id=organization_id, name="Sandbox", defaults={"kind": "sandbox"})
        CatalogModel.objects.filter(organization_id=organization_id).update(connection=sandbox)


class Migration(migrations.Migration):

    dependencies = [
        ('allowances', '0003_ledgerentry_api_key_keyspend'),
        ('gateway', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='catalogmodel',
            name='connection',
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT, related_name='models', to='gateway.providerconnection'),
        ),
        migrations.AddField(
            model_name='catalogmodel',
            name='max_output_tokens',
            field=models.PositiveIntegerField(default=4096),
        ),
        migrations.AddField(
            model_name='catalogmodel',
            name='upstream_model',
            field=models.CharField(blank=True, help_text="The provider's name for the model, if not the same id.", max_length=100),
        ),
        migrations.RunPython(route_existing_models_to_a_sandbox, migrations.RunPython.noop),
        migrations.RemoveField(
            model_name='catalogmodel',
            name='provider',
        ),
        migrations.AlterField(
            model_name='catalogmodel',
            name='connection',
            field=models.ForeignKey(help_text='The provider that serves this model.', on_delete=django.db.models.deletion.PROTECT, related_name='models', to='gateway.providerconnection'),
        ),
        migrations.AddConstraint(
            model_name='catalogmodel',
            constraint=models.CheckConstraint(condition=models.Q(('max_output_tokens__gt', 0)), name='catalog_max_output_positive'),
        ),
    ]
