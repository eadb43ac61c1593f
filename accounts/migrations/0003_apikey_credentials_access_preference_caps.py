import accounts.models
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0002_account_credentials_encrypted"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="credentials_access",
            field=models.BooleanField(
                default=False,
                help_text="Include the chosen account's decrypted credentials in dispatch responses for this key.",
            ),
        ),
        migrations.AlterField(
            model_name="apikey",
            name="model_preferences",
            field=models.JSONField(blank=True, default=dict, validators=[accounts.models.validate_model_preferences]),
        ),
    ]
