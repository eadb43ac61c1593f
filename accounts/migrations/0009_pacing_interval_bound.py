"""A pacing interval is at most 2,147,483,647 ms (about 24.8 days) on every
database: what PostgreSQL's integer column holds. SQLite's columns hold 64
bits, and an interval it took there (10**16 ms) failed every dispatch after
the next lease start, adding it to a datetime. Validators only: no SQL."""

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0008_api_key_change_notifies"),
    ]

    operations = [
        migrations.AlterField(
            model_name="apikey",
            name="min_start_interval_ms",
            field=models.PositiveIntegerField(
                default=0, validators=[django.core.validators.MaxValueValidator(2147483647)]
            ),
        ),
        migrations.AlterField(
            model_name="routingidentity",
            name="min_start_interval_ms",
            field=models.PositiveIntegerField(
                default=0, validators=[django.core.validators.MaxValueValidator(2147483647)]
            ),
        ),
    ]
