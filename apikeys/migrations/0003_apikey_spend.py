import django.db.models.deletion
from django.db import migrations, models


def give_every_key_a_spend_counter(apps, schema_editor):
    ApiKey = apps.get_model("apikeys", "ApiKey")
    KeySpend = apps.get_model("allowances", "KeySpend")
    # Oldest first, so a rotated key's successor finds its predecessor's counter.
    for key in ApiKey.objects.order_by("created_at", "id"):
        predecessor = ApiKey.objects.filter(rotated_to_id=key.pk).first()
        if predecessor is not None and predecessor.spend_id:
            key.spend_id = predecessor.spend_id
        else:
            key.spend_id = KeySpend.objects.create(organization_id=key.organization_id, token_cap=key.token_cap).pk
        key.save(update_fields=["spend"])


class Migration(migrations.Migration):

    dependencies = [
        ('allowances', '0003_ledgerentry_api_key_keyspend'),
        ('apikeys', '0002_form_token'),
    ]

    operations = [
        migrations.AddField(
            model_name='apikey',
            name='spend',
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT, related_name='keys', to='allowances.keyspend'),
        ),
        migrations.RunPython(give_every_key_a_spend_counter, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='apikey',
            name='spend',
            field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='keys', to='allowances.keyspend'),
        ),
    ]
